// The project's two hottest CPU loops in C++, built on first use by fused.py: the greedy prior rollout (imagination)
// and the tile cross-entropy (training, below).
//
// The greedy prior rollout (models.RSSM.greedy_rollout) as one C++ loop, CPU and float32 only.
// The batch is cut in tiles of `tile` rows; each thread rolls its tiles through the whole horizon on its own, its
// matrix products single-threaded (the prior's through oneDNN with weights packed once, the GRU's through ATen, so
// MKL in torch's x86 build: the faster of the two for each, measured), and between two products one pass over
// each row does all the rest: the input table's sums, biases, norms, activations, GRU gates, the most likely
// classes. No thread waits for another until the end, and a tile's buffers stay in its core's cache. The same
// states as the torch loop to float tolerance (tests/test_rssm.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// 16 floats as one vector (GCC / Clang vector extensions: one AVX-512 register, or two AVX2 ones)
typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof v); }

typedef int32_t Int16 __attribute__((vector_size(64)));

inline Vec16 clamp16(Vec16 v, float low, float high) {
  v = v < low ? Vec16{} + low : v;
  return v > high ? Vec16{} + high : v;
}

// e^x of 16 floats inline: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor polynomial to r^6 (relative
// error ~1e-7, a float's rounding), 2^n put in the exponent bits. x is clamped to [-87, 88] (no infinities under
// -ffast-math's finite-only arithmetic).
inline Vec16 exp16(Vec16 x) {
  x = clamp16(x, -87.0f, 88.0f);
  const Vec16 scaled = x * 1.44269504f;
  const Int16 ni = __builtin_convertvector(scaled + (scaled < 0.0f ? Vec16{} - 0.5f : Vec16{} + 0.5f), Int16);
  const Vec16 n = __builtin_convertvector(ni, Vec16);  // x / ln 2 rounded to the nearest integer
  const Vec16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts, the first exact
  Vec16 p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24, p = p * r + 1.0f / 6, p = p * r + 0.5f, p = p * r + 1.0f, p = p * r + 1.0f;
  const Int16 bits = (ni + 127) << 23;
  Vec16 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / d of 16 floats: AVX-512's 14-bit estimate and one Newton step (~1 ulp) where the CPU has it, else a division
inline Vec16 recip16(Vec16 d) {
#ifdef __AVX512F__
  __m512 dv;
  __builtin_memcpy(&dv, &d, sizeof d);
  const __m512 r = _mm512_rcp14_ps(dv);
  const __m512 better = _mm512_mul_ps(r, _mm512_fnmadd_ps(dv, r, _mm512_set1_ps(2.0f)));
  Vec16 out;
  __builtin_memcpy(&out, &better, sizeof out);
  return out;
#else
  return 1.0f / d;
#endif
}

inline Vec16 sigmoid16(Vec16 v) { return recip16(1.0f + exp16(-v)); }
inline Vec16 tanh16(Vec16 v) { return 1.0f - 2.0f * recip16(1.0f + exp16(2.0f * clamp16(v, -20.0f, 20.0f))); }

// exp's argument is clamped so that -ffast-math's finite-only arithmetic never meets an infinity
inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-std::min(std::max(v, -80.0f), 80.0f))); }
inline float tanh_(float v) { return 1.0f - 2.0f / (1.0f + std::exp(2.0f * std::min(std::max(v, -20.0f), 20.0f))); }

// out (n) = the GRU's new state from its gates [reset, candidate, update] (3 n, before their LayerNorm: each
// value v becomes (v - mean) * inv * gain + shift on the way) and the old state (n); the old state becomes the
// new one too.
inline void gru_units(const float* gate, float mean, float inv, const float* gain, const float* shift, float* old,
                      float* out, int64_t n) {
  int64_t j = 0;
  auto normed = [&](int64_t i) { return (load16(gate + i) - mean) * inv * load16(gain + i) + load16(shift + i); };
  for (; j + 16 <= n; j += 16) {
    const Vec16 reset = sigmoid16(normed(j));
    const Vec16 cand = tanh16(reset * normed(n + j));
    const Vec16 update = sigmoid16(normed(2 * n + j) - 1.0f);
    const Vec16 h = load16(old + j);
    const Vec16 next = h + update * (cand - h);
    store16(out + j, next), store16(old + j, next);
  }
  auto one = [&](int64_t i) { return (gate[i] - mean) * inv * gain[i] + shift[i]; };
  for (; j < n; ++j) {
    const float reset = sigmoid(one(j));
    const float cand = tanh_(reset * one(n + j));
    const float update = sigmoid(one(2 * n + j) - 1.0f);
    out[j] = old[j] + update * (cand - old[j]);
    old[j] = out[j];
  }
}

// n values in place: add shift0 (a layer's bias; may be null), then LayerNorm (biased variance, as torch's) with
// gain and shift, then SiLU if silu.
inline void norm(float* x, int64_t n, const float* shift0, const float* gain, const float* shift, float eps,
                 bool silu) {
  if (shift0)
    for (int64_t i = 0; i < n; ++i) x[i] += shift0[i];
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / n;
  float squares = 0.0f;
  for (int64_t i = 0; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(squares / n + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - mean) * inv * gain[i] + shift[i];
  if (!silu) return;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(x + i, load16(x + i) * sigmoid16(load16(x + i)));
  for (; i < n; ++i) x[i] *= sigmoid(x[i]);
}

// out (n) = start (n) + the sum of `count` rows of table (n wide each), 64 floats at a time in four registers.
inline void sum_rows(float* out, const float* start, const float* table, const int64_t* rows, int64_t count,
                     int64_t n) {
  int64_t i0 = 0;
  for (; i0 + 64 <= n; i0 += 64) {
    Vec16 a0 = load16(start + i0), a1 = load16(start + i0 + 16), a2 = load16(start + i0 + 32),
          a3 = load16(start + i0 + 48);
    for (int64_t r = 0; r < count; ++r) {
      const float* row = table + rows[r] * n + i0;
      a0 += load16(row), a1 += load16(row + 16), a2 += load16(row + 32), a3 += load16(row + 48);
    }
    store16(out + i0, a0), store16(out + i0 + 16, a1), store16(out + i0 + 32, a2), store16(out + i0 + 48, a3);
  }
  for (int64_t i = i0; i < n; ++i) out[i] = start[i];
  for (int64_t r = 0; r < count; ++r)
    for (int64_t i = i0; i < n; ++i) out[i] += table[rows[r] * n + i];
}

// Class-major logits (C, S) plus their bias -> best (S): each latent's most likely class, the first of a tie (as
// argmax), as a float. 16 latents at a time in registers where S allows.
inline void most_likely(const float* logits, const float* bias, int64_t stoch, int64_t classes, float* best) {
  int64_t s0 = 0;
  for (; s0 + 16 <= stoch; s0 += 16) {
    Vec16 top = load16(logits + s0) + load16(bias + s0), id = Vec16{} + 0.0f;
    for (int64_t c = 1; c < classes; ++c) {
      const Vec16 v = load16(logits + c * stoch + s0) + load16(bias + c * stoch + s0);
      const auto more = v > top;
      top = more ? v : top;
      id = more ? Vec16{} + static_cast<float>(c) : id;
    }
    store16(best + s0, id);
  }
  for (int64_t s = s0; s < stoch; ++s) {
    float top = logits[s] + bias[s];
    best[s] = 0.0f;
    for (int64_t c = 1; c < classes; ++c)
      if (logits[c * stoch + s] + bias[c * stoch + s] > top)
        top = logits[c * stoch + s] + bias[c * stoch + s], best[s] = static_cast<float>(c);
  }
}

// n floats (a multiple of 16) from src to dst, a 64-byte aligned row of the output: with non-temporal stores where
// the CPU has AVX-512 (the ~47 MB of features a rollout writes would only push the tile's buffers out of the cache)
inline void write_out(float* dst, const float* src, int64_t n) {
#ifdef __AVX512F__
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
  std::copy_n(src, n, dst);
#endif
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "fused greedy rollout: ", what); }

// c (m, n) = a (m, k) @ b (k, n), row-major (rows of a and c lda and ldc floats apart)
struct Product {
  const float* b;
  int64_t k, n;
  at::Tensor packed;  // oneDNN's copy of b for products of a whole tile (mkldnn::_reorder_linear_weight), or none

  void operator()(const float* a, int64_t m, int64_t lda, float* c, int64_t ldc) const {
    at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, at::kFloat);
    at::mm_out(out, at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, at::kFloat),
               at::from_blob(const_cast<float*>(b), {k, n}, at::kFloat));
  }

  // a (m, k) contiguous -> (m, n) contiguous: oneDNN's product with the packed weight for a whole tile (faster
  // than MKL's for the prior's layers on the project's CPU, session 21), else MKL's / ATen's into out
  at::Tensor operator()(const at::Tensor& a, const at::Tensor& out, int64_t tile) const {
    if (packed.defined() && a.size(0) == tile) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      torch::jit::Stack stack{a, packed, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                              c10::IValue()};
      op.callBoxed(&stack);
      at::Tensor product = stack[0].toTensor();
      check(product.is_contiguous() && product.size(0) == a.size(0) && product.size(1) == n,
            "oneDNN's product has another layout");
      return product;
    }
    (*this)(a.data_ptr<float>(), a.size(0), k, out.data_ptr<float>(), n);
    return out;
  }
};

// The model's weights as the loop reads them.
struct Weights {
  const float* table;  // (S C + A, X): the input layer's rows for one-hot [z, a]
  const float *in_bias, *in_gain, *in_shift;  // (X)
  const float *gru_gain, *gru_shift;  // (3 D)
  std::vector<const float*> prior_biases, prior_gains, prior_shifts;  // the last bias class-major (C, S)
  int64_t deter, width, groups, stoch, classes, tile;
  float eps;
  Product first;  // soft z (B, S C) @ the table's z rows: the first step's input layer
  std::vector<Product> gru;  // one per block: [x, h] slices (k) -> its gates (3 D / G)
  std::vector<Product> prior;  // the prior MLP's layers, the last one's outputs class-major
};

// Rows [begin, end) of the batch through the whole horizon, into feat (B, H, D + S C).
void roll_tile(const Weights& w, const float* h0, const float* z0, const int64_t* actions, int64_t horizon,
               float* feat, int64_t begin, int64_t end) {
  const int64_t n = end - begin, deter = w.deter, width = w.width, groups = w.groups;
  const int64_t stoch = w.stoch, classes = w.classes, latent = stoch * classes;
  const int64_t x_part = width / groups, h_part = deter / groups, k = x_part + h_part, g_out = 3 * h_part;
  std::vector<float> xh(groups * n * k);  // (G, n, k): each block's [x slice, h slice]
  std::vector<float> gates(groups * n * g_out);  // (G, n, 3 D / G)
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor h_t = at::empty({n, deter}, options);  // read by the prior's first layer
  float* h_p = h_t.data_ptr<float>();
  std::vector<at::Tensor> hidden;  // the prior's layer outputs, each (n, out)
  for (const auto& layer : w.prior) hidden.push_back(at::empty({n, layer.n}, options));
  std::vector<int64_t> rows(n * (stoch + 1));  // each latent's row in the input table, then the action's
  std::vector<float> x(n * width), best(stoch), onehot(latent);
  const bool streamed = reinterpret_cast<uintptr_t>(feat) % 64 == 0 && deter % 16 == 0 && latent % 16 == 0;
  std::copy(h0 + begin * deter, h0 + end * deter, h_p);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t g = 0; g < groups; ++g)
      std::copy_n(h_p + b * deter + g * h_part, h_part, xh.data() + (g * n + b) * k + x_part);
  // the first step's z part of the input layer: z0 @ the table's z rows; a start z with at most S non-zeros per row
  // (one-hot, or zeros) as the sum of those rows times their values, a soft one as a product
  const float* z = z0 + begin * latent;
  bool sparse = true;
  for (int64_t b = 0; b < n && sparse; ++b)
    sparse = std::count_if(z + b * latent, z + (b + 1) * latent, [](float v) { return v != 0.0f; }) <= stoch;
  if (sparse) {
    std::fill(x.begin(), x.end(), 0.0f);
    for (int64_t b = 0; b < n; ++b)
      for (int64_t j = 0; j < latent; ++j)
        if (z[b * latent + j] != 0.0f)
          for (int64_t i = 0; i < width; ++i) x[b * width + i] += z[b * latent + j] * w.table[j * width + i];
  } else {
    w.first(z, n, latent, x.data(), width);
  }

  for (int64_t t = 0; t < horizon; ++t) {
    // the input layer on [z, a]: its bias plus the action's row plus z's part (a product at t = 0, else S rows
    // of the table), norm, SiLU; into each block
    for (int64_t b = 0; b < n; ++b) {
      int64_t* r = rows.data() + b * (stoch + 1);
      float* xb = x.data() + b * width;
      r[stoch] = latent + actions[(begin + b) * horizon + t];
      if (t == 0)
        sum_rows(xb, xb, w.table, r + stoch, 1, width);
      else
        sum_rows(xb, w.table + r[stoch] * width, w.table, r, stoch, width);
      norm(xb, width, w.in_bias, w.in_gain, w.in_shift, w.eps, true);
      for (int64_t g = 0; g < groups; ++g) std::copy_n(xb + g * x_part, x_part, xh.data() + (g * n + b) * k);
    }
    for (int64_t g = 0; g < groups; ++g) w.gru[g](xh.data() + g * n * k, n, k, gates.data() + g * n * g_out, g_out);
    // the GRU's norm over all blocks' gates, then reset / candidate / update; the new h where it is read
    for (int64_t b = 0; b < n; ++b) {
      float sum = 0.0f, squares = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < g_out; ++i) sum += gates[(g * n + b) * g_out + i];
      const float mean = sum / (groups * g_out);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < g_out; ++i) {
          const float d = gates[(g * n + b) * g_out + i] - mean;
          squares += d * d;
        }
      const float inv = 1.0f / std::sqrt(squares / (groups * g_out) + w.eps);
      for (int64_t g = 0; g < groups; ++g)
        gru_units(gates.data() + (g * n + b) * g_out, mean, inv, w.gru_gain + g * g_out, w.gru_shift + g * g_out,
                  xh.data() + (g * n + b) * k + x_part, h_p + b * deter + g * h_part, h_part);
    }
    // the prior MLP on h: each hidden layer's bias, norm and SiLU row by row after its product
    at::Tensor in = h_t;
    for (size_t l = 0; l < w.prior.size(); ++l) {
      in = w.prior[l](in, hidden[l], w.tile);
      if (l + 1 < w.prior.size())
        for (int64_t b = 0; b < n; ++b)
          norm(in.data_ptr<float>() + b * w.prior[l].n, w.prior[l].n, w.prior_biases[l], w.prior_gains[l],
               w.prior_shifts[l], w.eps, true);
    }
    const float* logits = in.data_ptr<float>();
    // h and the one-hot of each latent's most likely class into the features
    for (int64_t b = 0; b < n; ++b) {
      most_likely(logits + b * latent, w.prior_biases.back(), stoch, classes, best.data());
      std::fill(onehot.begin(), onehot.end(), 0.0f);
      int64_t* r = rows.data() + b * (stoch + 1);
      for (int64_t s = 0; s < stoch; ++s) {
        const int64_t c = static_cast<int64_t>(best[s]);
        onehot[s * classes + c] = 1.0f;
        r[s] = s * classes + c;
      }
      float* f = feat + ((begin + b) * horizon + t) * (deter + latent);
      if (streamed) {
        write_out(f, h_p + b * deter, deter), write_out(f + deter, onehot.data(), latent);
      } else {
        std::copy_n(h_p + b * deter, deter, f), std::copy_n(onehot.data(), latent, f + deter);
      }
    }
  }
#ifdef __AVX512F__
  _mm_sfence();  // the streamed stores are visible before the caller reads the features
#endif
}

const float* floats(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fused greedy rollout: ", name, " must be a contiguous float32 CPU tensor");
  return t.data_ptr<float>();
}


// ---- the tile cross-entropy (models.WorldModel.forward's reconstruction loss of a tiles model) ----
// One pass over each row of logits gives its loss and its gradient (softmax - one-hot), the gradient kept in the
// logits' own type until the backward scales it in place (torch's cross-entropy under autocast copies the bfloat16
// logits to float32, keeps their log-softmax and makes the gradient in float32 before casting it back).

// 16 values of a row as floats, and back (bfloat16: the high half of a float's bits, rounded to nearest even)
inline Vec16 load16(const c10::BFloat16* p) {
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  Half16 half;
  __builtin_memcpy(&half, p, sizeof half);
  const Int16 bits = __builtin_convertvector(half, Int16) << 16;
  Vec16 v;
  __builtin_memcpy(&v, &bits, sizeof v);
  return v;
}

inline void store16(c10::BFloat16* p, Vec16 v) {
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  typedef uint32_t Uint16 __attribute__((vector_size(64)));
  Uint16 bits;
  __builtin_memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  const Half16 half = __builtin_convertvector(bits >> 16, Half16);
  __builtin_memcpy(p, &half, sizeof half);
}

inline float value(const float* p) { return *p; }
inline float value(const c10::BFloat16* p) { return static_cast<float>(*p); }

// rows [first, last) of logits (rows, n): loss[r] = logsumexp(row) - row[target[r]]; grad (may be null) =
// softmax(row) - one_hot(target[r]) in the logits' type. exps: n floats of scratch. Returns false if a target is
// outside [0, n).
template <typename T>
bool cross_entropy_rows(const T* logits, const int64_t* target, float* loss, T* grad, int64_t first, int64_t last,
                        int64_t n, float* exps) {
  const int64_t whole = n - n % 16;
  for (int64_t r = first; r < last; ++r) {
    const T* row = logits + r * n;
    const int64_t t = target[r];
    if (t < 0 || t >= n) return false;
    Vec16 top16 = Vec16{} - 3.0e38f;
    for (int64_t i = 0; i < whole; i += 16) {
      const Vec16 v = load16(row + i);
      top16 = v > top16 ? v : top16;
    }
    float top = -3.0e38f;
    for (int i = 0; i < 16; ++i) top = std::max(top, top16[i]);
    for (int64_t i = whole; i < n; ++i) top = std::max(top, value(row + i));
    Vec16 sum16 = Vec16{};
    for (int64_t i = 0; i < whole; i += 16) {
      const Vec16 e = exp16(load16(row + i) - top);
      store16(exps + i, e), sum16 += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += sum16[i];
    for (int64_t i = whole; i < n; ++i) sum += exps[i] = std::exp(std::max(value(row + i) - top, -87.0f));
    loss[r] = top + std::log(sum) - value(row + t);
    if (!grad) continue;
    const float inv = 1.0f / sum;
    T* out = grad + r * n;
    for (int64_t i = 0; i < whole; i += 16) store16(out + i, load16(exps + i) * inv);
    for (int64_t i = whole; i < n; ++i) out[i] = static_cast<T>(exps[i] * inv);
    out[t] = static_cast<T>(exps[t] * inv - 1.0f);
  }
  return true;
}

}  // namespace

// h0 (B, D), z0 (B, S C): the start state (z0 may be soft); actions (B, H) int64. table (S C + A, X) and in_bias /
// in_gain / in_shift (X): the GRU's input layer as rows for one-hot [z, a], then its LayerNorm; block_weight
// (G, (X + D) / G, 3 D / G): the GRU's layer on [x, h] (G = 1: dense), gru_gain / gru_shift (3 D): its LayerNorm;
// prior_weights: the prior MLP's layers, each (in, out), the last one's outputs class-major (C, S), prior_biases
// theirs, prior_gains / prior_shifts the hidden layers' LayerNorms.
// -> features (B, H, D + S C): [h, one-hot z] of each imagined step.
at::Tensor greedy_rollout(const at::Tensor& h0, const at::Tensor& z0, const at::Tensor& actions,
                          const at::Tensor& table, const at::Tensor& in_bias, const at::Tensor& in_gain,
                          const at::Tensor& in_shift, const at::Tensor& block_weight, const at::Tensor& gru_gain,
                          const at::Tensor& gru_shift, const std::vector<at::Tensor>& prior_weights,
                          const std::vector<at::Tensor>& prior_biases, const std::vector<at::Tensor>& prior_gains,
                          const std::vector<at::Tensor>& prior_shifts, const std::vector<at::Tensor>& prior_packed,
                          int64_t stoch, int64_t classes, double eps, int64_t tile) {
  check(actions.scalar_type() == at::kLong && actions.dim() == 2 && actions.is_contiguous(),
        "actions must be contiguous (B, H) int64");
  check(!prior_weights.empty() && prior_weights.size() == prior_biases.size() &&
            prior_gains.size() + 1 == prior_weights.size() && prior_shifts.size() == prior_gains.size(),
        "the prior needs a bias per layer and a norm per hidden layer");
  const int64_t batch = h0.size(0), deter = h0.size(1), horizon = actions.size(1), latent = stoch * classes;
  const int64_t width = table.size(1), groups = block_weight.size(0);
  check(z0.size(0) == batch && z0.size(1) == latent && actions.size(0) == batch, "h, z and actions differ in batch");
  check(block_weight.size(1) == (width + deter) / groups && block_weight.size(2) == 3 * deter / groups,
        "block_weight does not fit h and the table");
  check(prior_weights.front().size(0) == deter && prior_weights.back().size(1) == latent,
        "the prior must map h to S x C logits");
  const int64_t num_actions = table.size(0) - latent;
  check(actions.numel() == 0 ||
            (actions.min().item<int64_t>() >= 0 && actions.max().item<int64_t>() < num_actions),
        "an action is outside the input table's rows");
  const float* table_p = floats(table, "table");
  Weights w;
  w.table = table_p, w.first = {table_p, latent, width, at::Tensor()};
  w.in_bias = floats(in_bias, "in_bias"), w.in_gain = floats(in_gain, "in_gain");
  w.in_shift = floats(in_shift, "in_shift");
  w.gru_gain = floats(gru_gain, "gru_gain"), w.gru_shift = floats(gru_shift, "gru_shift");
  w.deter = deter, w.width = width, w.groups = groups, w.stoch = stoch, w.classes = classes, w.tile = tile;
  w.eps = static_cast<float>(eps);
  const float* block_p = floats(block_weight, "block_weight");
  const int64_t k = block_weight.size(1), g_out = block_weight.size(2);
  for (int64_t g = 0; g < groups; ++g) w.gru.push_back({block_p + g * k * g_out, k, g_out, at::Tensor()});
  for (size_t l = 0; l < prior_weights.size(); ++l) {
    w.prior.push_back({floats(prior_weights[l], "prior weight"), prior_weights[l].size(0), prior_weights[l].size(1),
                       l < prior_packed.size() ? prior_packed[l] : at::Tensor()});
    w.prior_biases.push_back(floats(prior_biases[l], "prior bias"));
    if (l < prior_gains.size()) {
      w.prior_gains.push_back(floats(prior_gains[l], "prior norm"));
      w.prior_shifts.push_back(floats(prior_shifts[l], "prior norm"));
    }
  }
  at::Tensor feat = at::empty({batch, horizon, deter + latent}, h0.options());
  const float *h0_p = floats(h0, "h"), *z0_p = floats(z0, "z");
  const int64_t* act_p = actions.data_ptr<int64_t>();
  float* feat_p = feat.data_ptr<float>();
  check(tile > 0, "tile must be positive");
  const int64_t tiles = (batch + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t first_tile, int64_t last_tile) {
    c10::InferenceMode no_autograd;  // grad mode is per thread: the workers' own is on
    for (int64_t index = first_tile; index < last_tile; ++index)
      roll_tile(w, h0_p, z0_p, act_p, horizon, feat_p, index * tile, std::min(batch, (index + 1) * tile));
  });
  return feat;
}


// logits (N, V) float32 or bfloat16, contiguous; target (N) int64 -> [loss (N) float32, grad (N, V) in the logits'
// type: d loss[r] / d logits[r], or an empty tensor when with_grad is false]. Rows in parallel.
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target, bool with_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "fused cross-entropy: logits must be a contiguous (N, V) float32 or bfloat16 CPU tensor");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.is_contiguous() && target.size(0) == logits.size(0),
              "fused cross-entropy: target must be a contiguous (N) int64 CPU tensor");
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty_like(logits) : at::Tensor();
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, 256, [&](int64_t first, int64_t last) {
    std::vector<float> exps(n);
    bool fine;
    if (logits.scalar_type() == at::kFloat)
      fine = cross_entropy_rows(logits.data_ptr<float>(), target.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                with_grad ? grad.data_ptr<float>() : nullptr, first, last, n, exps.data());
    else
      fine = cross_entropy_rows(logits.data_ptr<c10::BFloat16>(), target.data_ptr<int64_t>(),
                                loss.data_ptr<float>(), with_grad ? grad.data_ptr<c10::BFloat16>() : nullptr, first,
                                last, n, exps.data());
    if (!fine) ok = false;
  });
  TORCH_CHECK(ok, "fused cross-entropy: a target is outside [0, ", n, ")");
  return {loss, grad};
}

// grad (N, V) *= upstream (N) float32, row by row, in place (rounded once in grad's type).
void cross_entropy_backward(at::Tensor& grad, const at::Tensor& upstream) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && upstream.scalar_type() == at::kFloat &&
                  upstream.is_contiguous() && upstream.numel() == grad.size(0),
              "fused cross-entropy: the backward's gradient does not fit");
  const int64_t n = grad.size(1), whole = n - n % 16;
  const float* scale = upstream.data_ptr<float>();
  auto rows = [&](auto* g, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      auto* row = g + r * n;
      for (int64_t i = 0; i < whole; i += 16) store16(row + i, load16(row + i) * scale[r]);
      for (int64_t i = whole; i < n; ++i) row[i] = value(row + i) * scale[r];
    }
  };
  at::parallel_for(0, grad.size(0), 256, [&](int64_t first, int64_t last) {
    if (grad.scalar_type() == at::kFloat)
      rows(grad.data_ptr<float>(), first, last);
    else
      rows(grad.data_ptr<c10::BFloat16>(), first, last);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("greedy_rollout", &greedy_rollout, "models.RSSM.greedy_rollout in one C++ loop (CPU, float32)");
  m.def("cross_entropy_forward", &cross_entropy_forward, "per-row cross-entropy and its gradient (CPU)");
  m.def("cross_entropy_backward", &cross_entropy_backward, "the gradient scaled by the rows' upstream, in place");
}
