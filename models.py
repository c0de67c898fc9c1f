"""Every network of PokéDreamer: v1 (VAE, latent GRU dynamics, RAM probe) and v2 (discrete RSSM, heads, actor, critic)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused
from tiles import TileCodebook


# ===== v1 =====
# (VAE on 40x36 frames, GRU latent dynamics, multi-head RAM probe)


@dataclass
class VAEConfig:
    """Convolutional VAE on small frames (v1: 36x40 RGB, latent 32)."""

    height: int = 36
    width: int = 40
    latent_dim: int = 32
    channels: tuple = (32, 64, 128)  # one stride-2 4x4 conv per entry
    beta: float = 1.0  # weight of the KL term

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.height < 8 or self.width < 8 or self.latent_dim < 1 or not self.channels:
            raise ValueError(f"bad VAEConfig {self}")


class VAE(nn.Module):
    """Frame (B,3,H,W) in [0,1] -> Gaussian latent (B,D); latent -> frame through a mirrored decoder."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        sizes = [(config.height, config.width)]  # spatial size before each conv, then after the last
        layers, in_ch = [], 3
        for ch in config.channels:
            layers += [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.ReLU()]
            h, w = sizes[-1]
            sizes.append(((h - 2) // 2 + 1, (w - 2) // 2 + 1))  # k4 s2 p1
            in_ch = ch
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.bottom = (in_ch, *sizes[-1])  # 36x40 -> (128, 4, 5)
        flat = in_ch * sizes[-1][0] * sizes[-1][1]
        self.fc_mu = nn.Linear(flat, config.latent_dim)
        self.fc_logvar = nn.Linear(flat, config.latent_dim)
        self.fc_decode = nn.Linear(config.latent_dim, flat)
        layers = []
        outs = list(config.channels[-2::-1]) + [3]  # 128 -> 64 -> 32 -> 3
        for i, ch in enumerate(outs):
            (h, w), (th, tw) = sizes[-1 - i], sizes[-2 - i]
            # a k4 s2 p1 transposed conv doubles the size; output_padding recovers odd sizes (9 from 4)
            layers.append(nn.ConvTranspose2d(in_ch, ch, 4, stride=2, padding=1, output_padding=(th - 2 * h, tw - 2 * w)))
            layers.append(nn.ReLU() if i < len(outs) - 1 else nn.Sigmoid())
            in_ch = ch
        self.decoder = nn.Sequential(*layers)

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(frames)  # (B, 128*4*5)
        return self.fc_mu(feat), self.fc_logvar(feat).clamp(-10.0, 10.0)  # (B, D) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc_decode(z).view(-1, *self.bottom)  # (B, 128, 4, 5)
        return self.decoder(x)  # (B, 3, H, W) in [0, 1]

    def forward(self, frames: torch.Tensor):
        mu, logvar = self.encode(frames)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decode(z), mu, logvar

    def loss(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """BCE summed over pixels + beta * KL summed over latent dims, both averaged over the batch."""
        recon, mu, logvar = self(frames)
        batch = frames.shape[0]
        losses = {
            "recon": F.binary_cross_entropy(recon, frames, reduction="sum") / batch,
            "kl": -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / batch,
        }
        weights = {"recon": 1.0, "kl": self.config.beta}
        assert losses.keys() == weights.keys()
        return sum(weights[k] * losses[k] for k in losses), {k: v.item() for k, v in losses.items()}


@dataclass
class DynamicsConfig:
    """GRU over latents: (z_t, a_t) -> z_{t+1} and r_t."""

    latent_dim: int = 32
    num_actions: int = 8
    action_embed: int = 16
    hidden: int = 256
    reward_scale: float = 1.0  # weight of the reward loss next to the latent MSE
    # weight of a frozen RAM probe's position and map read off the predicted latents against RAM's
    # (0: the original's loss, latent MSE + reward only)
    probe_scale: float = 0.0
    # ours: the GRU state starts from z_0 through a learned layer (False: zeros, the original)
    init_from_latent: bool = False
    # ours: weight of RAM heads on the GRU state (tile position, map, facing after each action), which
    # teach the state to track where the player is and which way it faces (0: none, the original)
    state_scale: float = 0.0
    num_maps: int = 256  # map-id classes of the state heads

    def __post_init__(self):
        if (min(self.latent_dim, self.num_actions, self.action_embed, self.hidden, self.num_maps) < 1
                or self.probe_scale < 0 or self.state_scale < 0):
            raise ValueError(f"bad DynamicsConfig {self}")


STATE_COORD_SCALE = 16.0  # the state heads regress tile coordinates / 16


def place_loss(read: dict, places: dict, coord_scale: float) -> torch.Tensor:
    """Scaled position MSE + map cross-entropy of a reading {"xy": (N, 2), "map_logits": (N, M)} of the
    steps after the first of windows against RAM's `places` {"xy": (B, T, 2), "map_id": (B, T)}, N = B*(T-1)."""
    xy = places["xy"][:, 1:].reshape(-1, 2).float()
    return (F.mse_loss(read["xy"] / coord_scale, xy / coord_scale)
            + F.cross_entropy(read["map_logits"], places["map_id"][:, 1:].reshape(-1).long()))


class LatentDynamics(nn.Module):
    """h' = GRUCell([z, embed(a)], h); z' = z + head(h'); r = reward_head(h')."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.num_actions, config.action_embed)
        self.cell = nn.GRUCell(config.latent_dim + config.action_embed, config.hidden)
        self.head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.latent_dim))
        self.reward_head = nn.Sequential(nn.Linear(config.hidden, 64), nn.ReLU(), nn.Linear(64, 1))
        if config.init_from_latent:
            self.state_init = nn.Linear(config.latent_dim, config.hidden)
        if config.state_scale > 0:  # (x, y) | map logits | 4 facings, read off h
            self.state_head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.ReLU(),
                                            nn.Linear(config.hidden, 2 + config.num_maps + 4))

    def initial_state(self, z0: torch.Tensor) -> torch.Tensor:
        """The GRU state before the first action, from the first latent z0 (B,D) -> (B,H)."""
        if self.config.init_from_latent:
            return torch.tanh(self.state_init(z0))
        return z0.new_zeros(z0.shape[0], self.config.hidden)  # the original: zeros

    def step(self, z: torch.Tensor, action: torch.Tensor, h: torch.Tensor):
        """z (B,D), action (B,) int64, h (B,H) -> next z (B,D), reward (B,), next h (B,H)."""
        h = self.observe(z, action, h)  # (B, 256)
        return z + self.head(h), self.reward_head(h).squeeze(-1), h

    def unroll(self, z: torch.Tensor, actions: torch.Tensor, teacher_forcing: float = 1.0, generator=None,
               states: list | None = None):
        """Predict z_1..z_{T-1} from true latents z (B,T,D) and actions (B,T).

        Scheduled sampling: at every step after the first, each sequence's input is the true z_t with
        probability `teacher_forcing`, else the model's own previous prediction (gradients flow through
        it). teacher_forcing=0 is a fully open-loop rollout from z_0.
        Returns predicted latents (B,T-1,D) and rewards (B,T-1) for actions a_0..a_{T-2}; a list
        passed as `states` receives the GRU state after every action (T-1 tensors (B,H)).
        """
        batch, steps, _ = z.shape
        h = self.initial_state(z[:, 0])
        z_in, preds, rewards = z[:, 0], [], []
        for t in range(steps - 1):
            z_next, r, h = self.step(z_in, actions[:, t], h)
            preds.append(z_next)
            rewards.append(r)
            if states is not None:
                states.append(h)
            if teacher_forcing >= 1.0:
                z_in = z[:, t + 1]
            elif teacher_forcing <= 0.0:
                z_in = z_next
            else:
                use_true = torch.rand(batch, 1, device=z.device, generator=generator) < teacher_forcing  # (B, 1)
                z_in = torch.where(use_true, z[:, t + 1], z_next)
        return torch.stack(preds, 1), torch.stack(rewards, 1)

    def rollout(self, z0: torch.Tensor, actions: torch.Tensor, h0: torch.Tensor | None = None, project=None):
        """Open loop from z0 (B,D) with actions (B,K): latents z_1..z_K (B,K,D) and rewards (B,K).
        h0 (B,H): a GRU state filtered over real frames so far (`observe`); default: the initial state of z0.
        project: a map applied to every predicted latent before it is fed back and returned, e.g. the
        VAE's decode-then-encode, which puts an imagined latent back on the latents of real frames."""
        h = self.initial_state(z0) if h0 is None else h0
        z, preds, rewards = z0, [], []
        for t in range(actions.shape[1]):
            z, r, h = self.step(z, actions[:, t], h)
            if project is not None:
                z = project(z)
            preds.append(z)
            rewards.append(r)
        return torch.stack(preds, 1), torch.stack(rewards, 1)

    def observe(self, z: torch.Tensor, action: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """The GRU state after taking `action` (B,) from the real frame's latent z (B,D), given the
        state h before it (None: the first frame): a belief carried along a real episode."""
        h = self.initial_state(z) if h is None else h
        return self.cell(torch.cat([z, self.embed(action)], dim=-1), h)

    def loss(self, z: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, teacher_forcing: float = 1.0,
             probe: RamProbe | None = None, places: dict | None = None):
        """z (B,T,D) true latents, actions (B,T), rewards (B,T) -> (total, dict of floats).

        With config.probe_scale > 0, `probe` (frozen) reads every predicted latent and `places`
        ({"xy": (B,T,2) tiles, "map_id": (B,T)} from RAM) says where the player really was: the
        probe's scaled position MSE plus its map cross-entropy is added with that weight, so the
        rollout must stay readable as the right place, not only near in latent MSE. With
        config.state_scale > 0 the state heads read every GRU state against the same places and
        `places["facing"]` (B,T) (0..3: down, up, left, right).
        """
        states = [] if self.config.state_scale > 0 else None
        pred_z, pred_r = self.unroll(z, actions, teacher_forcing, states=states)
        return self.loss_of(pred_z, pred_r, z, rewards, probe, places, states)

    def read_state(self, h: torch.Tensor, coord_scale: float = STATE_COORD_SCALE) -> dict:
        """The state heads on GRU states h (N,H): tile (x, y) (N,2), map logits (N,M), facing logits (N,4)."""
        out = self.state_head(h)
        return {"xy": out[:, :2] * coord_scale, "map_logits": out[:, 2:-4], "facing_logits": out[:, -4:]}

    def loss_of(self, pred_z, pred_r, z, rewards, probe=None, places=None, states=None):
        """`loss` of predictions already unrolled: pred_z (B,T-1,D) and pred_r (B,T-1) against z (B,T,D),
        rewards (B,T); `states`, the GRU states of the unroll, when config.state_scale > 0."""
        losses = {"latent": F.mse_loss(pred_z, z[:, 1:]), "reward": F.mse_loss(pred_r, rewards[:, :-1])}
        weights = {"latent": 1.0, "reward": self.config.reward_scale}
        if self.config.state_scale > 0:
            if states is None or places is None or "facing" not in places:
                raise ValueError("state_scale > 0 needs the unroll's GRU states and the RAM places with facings")
            read = self.read_state(torch.stack(states, 1).reshape(-1, self.config.hidden), STATE_COORD_SCALE)
            losses["state"] = (place_loss(read, places, STATE_COORD_SCALE)
                               + F.cross_entropy(read["facing_logits"], places["facing"][:, 1:].reshape(-1).long()))
            weights["state"] = self.config.state_scale
        if self.config.probe_scale > 0:
            if probe is None or places is None:
                raise ValueError("probe_scale > 0 needs the frozen probe and the RAM places of the windows")
            read = probe(pred_z.reshape(-1, pred_z.shape[-1]))
            losses["probe"] = place_loss(read, places, probe.config.coord_scale)
            weights["probe"] = self.config.probe_scale
        assert losses.keys() == weights.keys()
        return sum(weights[k] * losses[k] for k in losses), {k: v.item() for k, v in losses.items()}


@dataclass
class ProbeConfig:
    """MLP heads reading RAM facts off a frozen VAE latent."""

    latent_dim: int = 32
    hidden: int = 256
    num_maps: int = 256
    party_size: int = 6
    coord_scale: float = 16.0  # (x, y) are regressed in tiles / coord_scale

    def __post_init__(self):
        if min(self.latent_dim, self.hidden, self.num_maps, self.party_size) < 1 or self.coord_scale <= 0:
            raise ValueError(f"bad ProbeConfig {self}")


class RamProbe(nn.Module):
    """Latent (B,D) -> tile (x, y), map-id logits, in-battle and dialog logits, party HP fractions."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = config
        self.trunk = nn.Sequential(nn.Linear(config.latent_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.hidden), nn.ReLU())
        self.xy = nn.Linear(config.hidden, 2)
        self.map_id = nn.Linear(config.hidden, config.num_maps)
        self.flags = nn.Linear(config.hidden, 2)  # in-battle, dialog-open logits
        self.hp = nn.Linear(config.hidden, config.party_size)

    def forward(self, z: torch.Tensor) -> dict:
        feat = self.trunk(z)  # (B, 256)
        flags = self.flags(feat)  # (B, 2)
        return {
            "xy": self.xy(feat) * self.config.coord_scale,  # (B, 2) in tiles
            "map_logits": self.map_id(feat),  # (B, 256)
            "battle_logit": flags[:, 0],  # (B,)
            "dialog_logit": flags[:, 1],  # (B,)
            "hp": torch.sigmoid(self.hp(feat)),  # (B, 6) fractions
        }

    @staticmethod
    def targets(batch: dict) -> dict:
        """Flatten a dataset batch (B,T,...) into probe targets (B*T, ...)."""
        max_hp = batch["party_max_hps"].reshape(-1, batch["party_max_hps"].shape[-1]).float()
        return {
            "xy": torch.stack([batch["xs"].reshape(-1), batch["ys"].reshape(-1)], -1).float(),  # (N, 2)
            "map_id": batch["map_ids"].reshape(-1).long(),
            "battle": batch["in_battles"].reshape(-1).float(),
            "dialog": batch["dialog_opens"].reshape(-1).float(),
            "hp": batch["party_hps"].reshape(max_hp.shape).float() / max_hp.clamp(min=1.0),  # (N, 6); 0 for empty slots
        }

    def loss(self, z: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        out = self(z)
        scale = self.config.coord_scale
        losses = {
            "xy": F.mse_loss(out["xy"] / scale, targets["xy"] / scale),
            "map": F.cross_entropy(out["map_logits"], targets["map_id"]),
            "battle": F.binary_cross_entropy_with_logits(out["battle_logit"], targets["battle"]),
            "dialog": F.binary_cross_entropy_with_logits(out["dialog_logit"], targets["dialog"]),
            "hp": F.mse_loss(out["hp"], targets["hp"]),
        }
        weights = {"xy": 10.0, "map": 1.0, "battle": 1.0, "dialog": 1.0, "hp": 1.0}
        assert losses.keys() == weights.keys()
        return sum(weights[k] * losses[k] for k in losses), {k: v.item() for k, v in losses.items()}

    @staticmethod
    def metrics(out: dict, targets: dict) -> dict:
        """Sums over the batch (divide by the count): Manhattan tile error, map accuracy, flag accuracies."""
        err = (out["xy"] - targets["xy"]).abs().sum(-1)  # (N,)
        rounded = (out["xy"].round() - targets["xy"]).abs().sum(-1)
        return {
            "tile_error": err.sum().item(),
            "tile_error_rounded": rounded.sum().item(),
            "exact_tile": (rounded == 0).float().sum().item(),
            "map_acc": (out["map_logits"].argmax(-1) == targets["map_id"]).float().sum().item(),
            "battle_acc": ((out["battle_logit"] > 0).float() == targets["battle"]).float().sum().item(),
            "dialog_acc": ((out["dialog_logit"] > 0).float() == targets["dialog"]).float().sum().item(),
            "hp_abs_error": (out["hp"] - targets["hp"]).abs().mean(-1).sum().item(),
        }

# ===== end v1 =====


# ===== v2 =====
# (discrete RSSM on native 160x144 frames)
#
# Shapes: B batch, T time, S = stoch * classes (one-hot latent, flattened), D = deter (GRU state),
# F = D + S (the feature [h, s] every head reads), E = encoder embedding size.

RSSM_PRESETS = ("faithful", "default", "global", "pixels", "tiny")


@dataclass
class RSSMConfig:
    """Every choice of the v2 world model. Stored in each checkpoint, so any script can rebuild the model."""

    preset: str = "pixels"  # the field defaults below are the "pixels" preset
    image_size: tuple = (144, 160)  # (H, W): each divisible by the product of conv_strides
    num_actions: int = 8
    # what the encoder reads and the decoder predicts: "pixels" (RGB, MSE) or "tiles" (the frame's 8x8 tiles
    # as ids of a codebook fitted to the data, tiles.py; cross-entropy over tile_vocab ids per grid cell)
    frame_model: str = "pixels"
    tile_vocab: int = 512
    # convolutional encoder and its mirror decoder; with "tiles" the first entry is the tile embedding
    # (stride 8 = one 8x8 tile per cell) and the decoder ends in a 1x1 conv to tile_vocab logits per cell
    conv_channels: tuple = (32, 64, 128)  # one entry per downsampling conv
    conv_strides: tuple = (4, 2, 2)  # kernel = max(conv_kernel, stride), padding (kernel - stride) // 2
    conv_kernel: int = 4  # smallest kernel of each conv and transposed conv (2 with stride 2: cells do not overlap)
    conv_residual: bool = False  # a residual block (two 3x3 convs + norm) after each downsampling conv
    conv_norm: str = "layer"  # "batch" | "layer" (over channels, per pixel) | "none"
    conv_act: str = "silu"  # "relu" | "elu" | "silu"
    embed_dim: int = 0  # > 0: a linear layer maps the flattened conv output to this size; 0: use it as is
    decoder_output: str = "linear"  # "sigmoid" | "linear" (prediction = 0.5 + output, clamped only for display)
    channels_last: bool = True  # memory format of the conv stacks (a speed choice only)
    decoder_blocks: int = 0  # residual blocks (two 3x3 convs + norm each) on the decoder's coarsest grid
    # "tiles" only, training only: each grid cell's tile embedding in the encoder is zeroed with this
    # probability (the kept ones scaled by 1 / (1 - p), as dropout does), so that the posterior must take the
    # hidden cells from its belief; the reconstruction target stays the whole frame (0: off)
    embed_dropout: float = 0.0
    # > 0: the decoder first maps the features through a hidden layer of this width (Linear -> norm -> act,
    # the MLPs' norm and activation), then to its coarsest grid; 0: one linear layer from the features to the grid
    decoder_hidden: int = 0
    # "tiles" only, > 0: a per-cell branch of this width at the tile grid: each cell adds
    # Linear(act(norm(Linear(features) + its own learned vector))) to the features the tile head reads, so that
    # what the features say can land on one cell (a character at any place) without a code per place; 0: off
    decoder_broadcast: int = 0
    # > 0: this many sprite slots added to the decoder's coarsest grid: each slot is one appearance vector put
    # at one place, a softmax over the grid's rows times one over its columns, all three linear in the features,
    # so that a character drawn once can land on any cell (the grid's own linear layer learns each cell apart);
    # 0: off
    decoder_slots: int = 0
    # recurrent state-space model
    deter: int = 256  # GRU state size D
    stoch: int = 32  # number of categorical latents
    classes: int = 16  # classes per latent
    # True: the last (cells of the encoder's coarsest grid, 9 x 10 at 144x160 with strides 8, 2) of the `stoch`
    # latents are local, one per cell: its posterior reads only that cell's encoder channels (and h), and the
    # decoder puts it back on that cell alone (one linear map from its classes to the cell's channels), so that a
    # character standing anywhere is one latent at its place; the prior still predicts every latent from h.
    # Needs embed_dim 0 (the embedding is the grid) and stoch > cells; False: every latent global
    local_latents: bool = False
    local_per_cell: int = 1  # local latents only: how many of them each cell has (the cell's ones adjacent)
    # local latents only: False: the GRU reads the global latents and the action alone, so that the local latents
    # describe the frame the posterior sees, and imagination's state never reads the prior's guesses of them (its
    # rows of the input layer are zeros in `_input_table`); True: the GRU reads every latent
    local_in_state: bool = True
    # local latents kept out of the GRU only: True: the local latents' prior reads h without passing gradients back
    # to it (their KL trains the prior's layers, never the GRU, so that h carries what the next states need rather
    # than every cell's details), and latent overshooting pulls only the latents the GRU reads (the others are never
    # fed back); the same forward values; False: the prior of every latent trains h
    local_detached: bool = False
    hidden: int = 256  # width of the prior / posterior / input MLPs
    # True: the state h of a sequence's first frame is read from that frame (tanh of norm -> act -> linear on the
    # posterior's projection of its embedding) instead of zeros, so that one observed frame puts where the player is
    # into h directly, not only through its latents; False: zeros (the original's)
    initial_from_frame: bool = False
    prior_layers: int = 1  # hidden layers of the prior MLP on h (0: the prior's logits are one linear layer of h)
    gru: str = "layernorm"  # "torch": nn.GRUCell on [z, action]; "layernorm": input MLP, then a LayerNorm GRU
    # "layernorm" only: the GRU's linear layer on [x, h] is block-diagonal in this many blocks (DreamerV3's
    # blocks); block g's gates read the g-th slices of x and h, so that layer costs 1/blocks of its FLOPs
    gru_blocks: int = 1
    mlp_norm: str = "layer"  # "none" | "layer" | "rms"
    mlp_act: str = "silu"  # "relu" | "elu" | "silu"
    unimix: float = 0.01  # mix this much of the uniform distribution into every categorical
    sampler: str = "categorical"  # "gumbel": straight-through Gumbel-softmax; "categorical": straight-through one-hot sample
    gumbel_tau: float = 1.0
    # heads on [h, s]
    head_hidden: int = 256
    reward_head: str = "twohot"  # "mse": one output, MSE loss | "twohot": symlog two-hot over twohot_bins
    twohot_bins: int = 255
    twohot_range: float = 20.0  # bins span [-range, range] in symlog space
    # losses: total = sum(weight[k] * loss[k]), see WorldModel.loss_weights
    recon_loss: str = "sum"  # "mean": mean pixel MSE | "sum": squared error summed over each frame
    recon_scale: float = 1.0
    # "tiles" only: in the reconstruction loss, a cell whose tile differs from the previous frame's once the
    # camera's scroll is undone (`sprite_changes`: a character that moved or turned, a text box) weighs this
    # much, every other cell 1 (1: all cells alike)
    recon_change_weight: float = 1.0
    # < 1: each training step decodes only this fraction of its windows' frames (drawn afresh each step; the
    # encoder, posterior, prior and heads still see every frame), an unbiased estimate of the reconstruction loss
    # for less decoder work; validation decodes every frame
    recon_fraction: float = 1.0
    kl_scale: float = 1.0  # multiplies both KL terms
    kl_dyn: float = 0.5  # weight of KL(sg(post) || prior): trains the prior
    kl_rep: float = 0.1  # weight of KL(post || sg(prior)): regularises the posterior
    free_nats: float = 1.0  # each step's KL (summed over latents) is clipped below at this value
    # latent overshooting: the prior is also rolled open loop up to this many steps from every posterior
    # state of a window, and each k-step prior is pulled to the posterior k frames later (0: off)
    overshoot: int = 0  # the default preset uses 5
    overshoot_scale: float = 0.5  # weight of the overshooting KL (clipped at free_nats, like kl_dyn)
    # > 0: RAM heads on the features [h, z] (`PlaceHead`: the player's tile x and y, the map id and the facing,
    # each a cross-entropy over its byte's values), trained with this weight on every posterior state and, with
    # overshoot, on every open-loop prior state, so that the state tracks where the player is and imagination
    # keeps it (privileged information from the logged RAM, as the reward is; the data always has it; 0: off)
    place_scale: float = 0.0
    # what the place heads read: "features" ([h, z]) or "deter" (h alone, so that where the player is must be
    # carried in the state the GRU passes on, not in the latents the prior guesses afresh each imagined step)
    place_input: str = "features"
    # > 0 (with place_scale): from each window's first this many posterior states the prior alone is also rolled
    # to the window's last frame (its own samples fed back, as overshoot does), and the place heads' loss is taken on
    # every state of those rollouts too, so that imagined states keep the player's place deeper than overshoot's
    # steps (up to seq_len - 1 of them; no KL on them); 0: off
    place_rollout: int = 0
    # True (with place_scale): the place heads also read whether a battle is on and whether a text box is open (RAM's
    # in-battle and dialog bytes), on the same states, so that the state carries what decides whether a step's button
    # moves the player at all; False: where the player is and faces only
    place_scenes: bool = False
    reward_scale: float = 1.0
    continue_scale: float = 1.0
    grad_clip: float = 1000.0  # max global grad norm
    lr: float = 3e-4  # Adam learning rate train_rssm.py uses unless --lr is given
    # "constant" | "cosine": train_rssm.py anneals the learning rate from lr to lr * lr_final along a cosine
    # over the run (its epochs x batches, or --time-budget's minutes, whichever ends first)
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    # > 0: train_rssm.py steps AdamW with this decoupled weight decay on every matrix and kernel (not on biases
    # or norm gains); 0: plain Adam
    weight_decay: float = 0.0
    # > 0: train_rssm.py keeps an exponential moving average of the weights (each update moves it this fraction
    # less than all the way: avg += (1 - ema_decay) (weights - avg)); validation and the saved models
    # (best_world_model.pt, world_model_epoch_NNN.pt) are the average; 0: the weights as trained
    ema_decay: float = 0.0
    # "bfloat16": train_rssm.py runs each training step's forward pass under torch.autocast in bfloat16 (matrix
    # products and convolutions; weights, optimizer, the latents' distributions and validation stay float32): more
    # updates per minute on a CPU with AVX-512 BF16 or a GPU; "float32": plain; "auto": bfloat16 where the device
    # computes it natively, else float32 (`checkpoint.train_precision`)
    train_precision: str = "float32"
    # when training in bfloat16: the last this fraction of the run (of its epochs x batches, or of
    # --time-budget's minutes, whichever ends first, as lr_schedule counts) trains in float32 (0: bfloat16 throughout)
    float32_tail: float = 0.0
    # train_rssm.py draws each training window that shows a battle this many times per epoch (battles are ~1.5%
    # of make demo's frames and the hardest to reconstruct); 1: every window once
    battle_repeats: int = 1
    # train_rssm.py draws each training window (without a battle) in which the map changes this many times per epoch
    # (a door or a cave's mouth: a map taken a step early or late puts the imagined player far off); 1: every window once
    map_change_repeats: int = 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RSSMConfig":
        """The named preset with some fields replaced; unknown names, fields and wrong types raise ValueError."""
        if name not in RSSM_PRESETS:
            raise ValueError(f"unknown RSSM preset {name!r}; choose one of {', '.join(RSSM_PRESETS)}")
        base = dict(_RSSM_PRESET_FIELDS[name], preset=name)
        base.update(overrides)
        return cls.from_dict(base)

    @classmethod
    def from_dict(cls, values: dict) -> "RSSMConfig":
        """Build from a plain dict (a checkpoint's or JSON's); rejects unknown keys and wrong types."""
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RSSMConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        clean = {}
        for key, value in values.items():
            want = type(getattr(defaults, key))
            if want is tuple and isinstance(value, (list, tuple)):
                value = tuple(value)
            elif want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"RSSMConfig.{key} must be {want.__name__}, got {value!r}")
            clean[key] = value
        config = cls(**clean)
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def coarse_grid(self) -> tuple[int, int, int]:
        """(channels, rows, columns) of the encoder's coarsest grid (the decoder's first)."""
        factor = math.prod(self.conv_strides)
        return self.conv_channels[-1], self.image_size[0] // factor, self.image_size[1] // factor

    def local_count(self) -> int:
        """How many of the `stoch` latents are local (`local_latents`): `local_per_cell` per coarse grid cell, or 0."""
        return self.coarse_grid()[1] * self.coarse_grid()[2] * self.local_per_cell if self.local_latents else 0

    def state_latents(self) -> int:
        """How many of the `stoch` latents the GRU reads (`local_in_state`): the first ones, all but the local."""
        return self.stoch if self.local_in_state else self.stoch - self.local_count()

    def validate(self) -> None:
        choices = {
            "conv_norm": ("batch", "layer", "none"), "conv_act": tuple(_ACTIVATIONS), "mlp_act": tuple(_ACTIVATIONS),
            "decoder_output": ("sigmoid", "linear"), "gru": ("torch", "layernorm"), "mlp_norm": ("none", "layer", "rms"),
            "sampler": ("gumbel", "categorical"), "reward_head": ("mse", "twohot"), "recon_loss": ("mean", "sum"),
            "frame_model": ("pixels", "tiles"), "lr_schedule": ("constant", "cosine"),
            "train_precision": ("float32", "bfloat16", "auto"), "place_input": ("features", "deter"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"RSSMConfig.{key}={getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        if len(self.conv_channels) != len(self.conv_strides):
            raise ValueError("RSSMConfig.conv_channels and conv_strides must have the same length")
        if self.conv_kernel < 2 or self.conv_kernel % 2:
            raise ValueError(f"RSSMConfig.conv_kernel={self.conv_kernel} must be even and >= 2")
        if self.gru_blocks < 1 or self.deter % self.gru_blocks or self.hidden % self.gru_blocks:
            raise ValueError(f"RSSMConfig.gru_blocks={self.gru_blocks} must be >= 1 and divide deter ({self.deter}) "
                             f"and hidden ({self.hidden})")
        if self.gru_blocks > 1 and self.gru != "layernorm":
            raise ValueError("RSSMConfig.gru_blocks > 1 needs gru='layernorm'")
        if self.prior_layers < 0:
            raise ValueError(f"RSSMConfig.prior_layers={self.prior_layers} must be >= 0")
        if self.decoder_broadcast < 0 or (self.decoder_broadcast and self.frame_model != "tiles"):
            raise ValueError(f"RSSMConfig.decoder_broadcast={self.decoder_broadcast} must be >= 0, and applies to "
                             "frame_model='tiles' only")
        if self.local_latents and (self.embed_dim or self.stoch <= self.local_count()):
            raise ValueError(f"RSSMConfig.local_latents needs embed_dim 0 and stoch above the {self.local_count()} "
                             f"cells of the coarse grid (stoch={self.stoch}, embed_dim={self.embed_dim})")
        if not 0 < self.recon_fraction <= 1:
            raise ValueError(f"RSSMConfig.recon_fraction={self.recon_fraction} must be in (0, 1]")
        if self.local_per_cell < 1:
            raise ValueError(f"RSSMConfig.local_per_cell={self.local_per_cell} must be >= 1")
        if not self.local_in_state and not self.local_latents:
            raise ValueError("RSSMConfig.local_in_state=False applies to local_latents=True only")
        if self.local_detached and (self.local_in_state or not self.local_latents or self.place_input != "deter"):
            raise ValueError("RSSMConfig.local_detached applies to local_latents=True with local_in_state=False and "
                             "place_input='deter' only")
        if self.decoder_slots < 0:
            raise ValueError(f"RSSMConfig.decoder_slots={self.decoder_slots} must be >= 0")
        if self.decoder_blocks < 0 or self.decoder_hidden < 0:
            raise ValueError(f"RSSMConfig.decoder_blocks={self.decoder_blocks} and decoder_hidden={self.decoder_hidden} "
                             "must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"RSSMConfig.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"RSSMConfig.weight_decay={self.weight_decay} must be >= 0")
        if self.recon_change_weight < 0:
            raise ValueError(f"RSSMConfig.recon_change_weight={self.recon_change_weight} must be >= 0")
        if self.recon_change_weight != 1.0 and self.frame_model != "tiles":
            raise ValueError("RSSMConfig.recon_change_weight applies to frame_model='tiles' only; leave it at 1.0")
        if not 0 <= self.embed_dropout < 1:
            raise ValueError(f"RSSMConfig.embed_dropout={self.embed_dropout} must be in [0, 1)")
        if self.embed_dropout and self.frame_model != "tiles":
            raise ValueError("RSSMConfig.embed_dropout applies to frame_model='tiles' only; leave it at 0")
        for name in ("battle_repeats", "map_change_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"RSSMConfig.{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.lr_final <= 1:
            raise ValueError(f"RSSMConfig.lr_final={self.lr_final} must be in [0, 1] (a fraction of lr)")
        if self.overshoot < 0 or self.overshoot_scale < 0:
            raise ValueError("RSSMConfig.overshoot and overshoot_scale must be >= 0")
        if not 0 <= self.float32_tail <= 1 or (self.float32_tail and self.train_precision == "float32"):
            raise ValueError(f"RSSMConfig.float32_tail={self.float32_tail} must be in [0, 1] and applies to "
                             "train_precision 'bfloat16' or 'auto' only")
        if self.place_scale < 0:
            raise ValueError(f"RSSMConfig.place_scale={self.place_scale} must be >= 0")
        if self.place_scenes and not self.place_scale:
            raise ValueError("RSSMConfig.place_scenes needs place_scale > 0 (it adds to the place heads)")
        if self.place_rollout < 0 or (self.place_rollout and not self.place_scale):
            raise ValueError(f"RSSMConfig.place_rollout={self.place_rollout} must be >= 0 and needs place_scale > 0")
        factor = math.prod(self.conv_strides)
        height, width = self.image_size
        if height % factor or width % factor:
            hint = "; tile presets (default) read native 144x160 frames: use --preset pixels" if self.frame_model == "tiles" else ""
            raise ValueError(f"image size {height}x{width} is not divisible by the conv stack's total stride {factor}{hint}")
        if self.frame_model == "tiles" and (self.conv_strides[0] != 8 or self.conv_residual or self.tile_vocab < 2):
            raise ValueError("RSSMConfig with frame_model='tiles' needs conv_strides[0] == 8 (one cell per 8x8 tile), "
                             "conv_residual=False and tile_vocab >= 2")


# The tile-token model with 32 latents, all read by the GRU: the "global" preset, and the default's base.
_GLOBAL_TILES = dict(frame_model="tiles", conv_channels=(64, 128), conv_strides=(8, 2), lr=1e-3, overshoot=5,
                     gru_blocks=8, kl_rep=0.5, place_scale=10.0, ema_decay=0.995, place_input="deter",
                     recon_fraction=0.25, initial_from_frame=True)

_RSSM_PRESET_FIELDS = {
    # The original v2 model, layer for layer (~56.7 M parameters in the world model).
    "faithful": dict(
        conv_channels=(32, 64, 128, 256), conv_strides=(2, 2, 2, 2), conv_residual=True, conv_norm="batch",
        conv_act="relu", embed_dim=512, decoder_output="sigmoid", channels_last=False,
        deter=512, stoch=32, classes=32, hidden=512, gru="torch", mlp_norm="none", mlp_act="elu", unimix=0.0,
        sampler="gumbel", gumbel_tau=1.0, head_hidden=256, reward_head="mse", recon_loss="mean",
        kl_dyn=0.8, kl_rep=0.2, free_nats=0.0, grad_clip=10.0,
    ),
    # DreamerV3 recipes (free nats, KL dyn 0.5, 1% unimix, symlog two-hot reward, LayerNorm + SiLU; KL rep 0.5
    # instead of its 0.1, below) on
    # tile tokens (tiles.py): an embedding per 8x8 tile, one stride-2 conv to 9x10; the decoder predicts each
    # of the 18x20 cells' tile id out of a 512-entry codebook fitted to the training frames. Cross-entropy on
    # tile ids trains fastest at lr 1e-3 (posterior PSNR 18.6 dB vs 14.8 at 3e-4 after 14 minutes).
    # Latent overshooting up to 5 steps (session 7: in 20 minutes, tile error 4.18 / 5.72 at imagined steps 29 / 50
    # against 5.17 / 6.39 without, and the same reconstruction). A block-diagonal GRU in 8 blocks (session 8: at
    # equal updates, tile error 5.92 / 7.34 at steps 29 / 50 against 6.70 / 8.55 dense, the same reconstruction;
    # the GRU layer has 1/8 of the FLOPs; imagination 1.60x as fast, timed in turns in benchmark.py --hot-paths).
    # Tried and not adopted (session 11, 20 minutes each): a linear prior (prior_layers=0; imagination 1.19x as fast)
    # and half-width MLPs (hidden=128) drift more on held-out episodes. The posterior's pull to the prior 5x
    # DreamerV3's (kl_rep 0.5; sessions 11-12, two seeds of 20 minutes: tile error 3.49 / 4.71 at steps 29 / 50
    # and map accuracy 0.911 against 3.64 / 5.13 and 0.879 with 0.1, the seeds' means). Tried and not adopted
    # (session 12): AdamW's weight decay (weight_decay=0.05) drifts more. Tried and not adopted (session 13, one
    # seed each): weighting the cells that moved against the background 5x (recon_change_weight=5), a hidden
    # layer before the decoder's grid (decoder_hidden=768) and kl_rep 0.75 reconstruct or imagine worse.
    # Tried and not adopted (session 14): lr 2e-3 (24.85 dB validation after 2,187 updates against 27.14-27.56)
    # and overshoot_scale 1.0 (27.02 dB there; held out it drifts more). Tried and not adopted (session 15): hiding
    # 15% of the encoder's input cells (embed_dropout=0.15) reconstructs 0.7 dB worse and drifts more.
    # Tried and not adopted (session 16, 20 minutes, seed 0): 32 x 8 latents (classes=8), a GRU state of 512
    # (deter=512) and a prior of two hidden layers (prior_layers=2) drift more at step 50 on held-out episodes.
    # Place heads on the posterior and open-loop states (place_scale=10; session 17, two seeds of 20 minutes: tile
    # error 2.49 / 3.43 and 2.69 / 3.86 at steps 29 / 50 against session 16's 3.43 / 4.29 and 3.72 / 4.71 without).
    # Tried and not adopted (session 17, one seed): a per-cell branch in the decoder (decoder_broadcast=256).
    # Tried and not adopted (session 19): place_scale=30 (one seed), and bfloat16 training over three seeds (float32
    # drifts less on average). Batch size is train_rssm.py's: 16 windows drift less than 8 (three seeds, session 19).
    # Session 20: at batch 16, bfloat16 drifts less than float32 at step 50 (three seeds), so `make demo` trains with
    # train_precision=auto there; this field stays float32 for other batch sizes. Tried and not adopted (one seed
    # each, batch 16 in bfloat16 unless said): batch 24, lr 1.5e-3. Session 21: battle_repeats=4 (one seed).
    # Session 22 (one seed): 8 sprite slots in the decoder (decoder_slots=8) drift more, reconstruct the same; local
    # latents (local_latents=True, stoch=122) reconstruct at 29.7 dB and imagine far worse. A moving average of the
    # weights (ema_decay=0.995; session 22, three seeds, each against the same weights as trained: 1.77 / 3.08,
    # 1.75 / 2.34 and 1.77 / 2.68 tiles at steps 29 / 50 against 2.50 / 3.61, 2.05 / 2.98 and 2.29 / 3.39; 28.16,
    # 28.26 and 28.24 dB against 27.89, 27.82 and 27.92). Place heads on h alone (place_input="deter"; session 23,
    # float32 on an AVX2 CPU, two seeds each against the same seed without: 3.42 / 4.82 and 3.37 / 4.67 tiles at steps
    # 29 / 50 against 3.88 / 5.40 and 3.46 / 4.71; 27.77 and 27.79 dB against 27.83 and 27.68). Tried and not adopted
    # (session 23, one seed): local latents kept out of the GRU (local_in_state=False) reconstruct 0.47 dB better and
    # drift more. Decoding a quarter of each step's frames (recon_fraction=0.25; session 24, float32 on the AVX2 CPU,
    # two seeds: ~2,500 updates in 20 minutes against ~1,380, 2.11 / 3.03 and 2.14 / 2.61 tiles at steps 29 / 50
    # against 3.42 / 4.82 and 3.37 / 4.67, 28.01 and 28.13 dB against 27.77 and 27.79; a third seed 1.80 / 2.40, 28.04).
    # Tried and not adopted (session 24, two seeds): an eighth (recon_fraction=0.125), 2.22 / 2.59 tiles and 27.96 dB
    # on average against a quarter's 2.13 / 2.82 and 28.07 on the same seeds. Tried and not adopted (session 25):
    # 2-wide stride-2 convolutions (conv_kernel=2; three seeds: 1.2x the updates, 28.13 dB and 3.19 wrong tiles per
    # frame against 28.06 and 3.40, but 2.16 / 3.12 tiles at steps 29 / 50 against 2.02 / 2.68) and, one seed each,
    # a slower weight average (ema_decay=0.998) and the prior's KL weighed twice (kl_dyn=1.0). Tried and not adopted
    # (session 26, one seed each): the place heads also on deep open-loop rollouts (place_rollout=3; 3.16 / 4.89
    # tiles against 2.11 / 3.03) and on the battle and text-box bytes (place_scenes=True; 2.10 / 3.09); and, two
    # seeds, local latents kept out of the GRU with a quarter decoded (local_latents=True, stoch=122,
    # local_in_state=False): 29.23 and 28.95 dB against 28.01 and 28.13, but 2.90 / 3.81 and 2.62 / 3.95 tiles.
    # Tried and not adopted (session 27, one seed): the windows with a map change drawn three times an epoch
    # (map_change_repeats=3): 2.49 / 3.75 tiles against 2.11 / 3.03, its map-change windows worse too; and
    # (two seeds each) two local latents a cell kept out of the GRU (local_latents=True, stoch=212, local_per_cell=2,
    # local_in_state=False): 29.49 and 29.33 dB, with battle_repeats=3 too 29.75 and 29.98 dB, all drifting more.
    # The first state read from the first frame (initial_from_frame=True; session 28, three seeds against the same
    # seeds without: 0.87 / 1.55, 1.20 / 1.71 and 0.97 / 1.54 tiles at steps 29 / 50 by the place heads against
    # 1.80 / 2.68, 1.77 / 2.29 and 1.50 / 2.03, by the probe 1.37 / 1.84, 1.61 / 2.04 and 1.29 / 1.85 against
    # 2.11 / 3.03, 2.14 / 2.61 and 1.80 / 2.40; 28.18, 28.31 and 28.20 dB against 28.01, 28.13 and 28.04). Tried and not adopted (session 28, seed 1, on local2 with battle_repeats=3):
    # conv_kernel=2 (29.91 dB against 29.98), battle_repeats=5 instead (validation 29.57 dB against 29.94); the same
    # local latents with initial_from_frame=True reconstruct at 30.10 dB and drift more than this preset (one seed).
    # Session 29: the same with local_detached=True (three seeds): 30.53, 30.08 and 29.82 dB, 1.14x the updates, and
    # 2.03 / 3.23, 1.23 / 1.71 and 1.55 / 2.82 tiles at steps 29 / 50 by the place heads, more than this preset's
    # 0.87 / 1.55, 1.20 / 1.71 and 0.97 / 1.54 on two seeds; not adopted. On its seed 0: place_scenes=True drifts no
    # less, place_scale=20 less (1.46 / 2.64 tiles, 30.41 dB), but on seed 2 more at step 29 (1.87 / 2.70, 30.79 dB).
    # Session 30, on a CPU with AMX (bfloat16 training: 3,720-3,911 updates in 20 minutes against ~2,150 in float32
    # on the AVX2 CPU), the same local model on three seeds: 30.92, 30.43 and 30.30 dB held out, 0.70 / 1.14,
    # 0.62 / 1.14 and 1.04 / 1.73 tiles at steps 29 / 50 by the place heads (from 64 futures 0.75 / 0.96, 0.68 / 1.32
    # and 0.85 / 1.88). The default since session 30; the preset before it is "global" below.
    "default": dict(_GLOBAL_TILES, local_latents=True, stoch=212, local_per_cell=2, local_in_state=False,
                    local_detached=True, battle_repeats=3),
    # The default of sessions 28-29: 32 latents, all read by the GRU, no local latents. In float32 on the AVX2 CPU
    # it drifted less than the default does there (session 29) and reconstructs at ~28.2 dB (session 28).
    "global": _GLOBAL_TILES,
    # The same RSSM and heads on RGB pixels (MSE): a stride-4 patch conv then two stride-2 convs down to
    # 9x10, the mirror decoder. For frames that are not native Game Boy frames (downscaled, colour).
    "pixels": dict(),
    # Seconds-fast model for tests.
    "tiny": dict(
        conv_channels=(8, 16, 16), deter=32, stoch=4, classes=4, hidden=32, head_hidden=32, twohot_bins=31,
    ),
}

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map (cheap in channels_last)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_norm(kind: str, channels: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm2d(channels), "layer": lambda: ChannelNorm(channels), "none": nn.Identity}[kind]()


def _mlp_norm(kind: str, width: int) -> nn.Module:
    return {"layer": lambda: nn.LayerNorm(width), "rms": lambda: nn.RMSNorm(width), "none": nn.Identity}[kind]()


def mlp(inp: int, hidden: int, layers: int, out: int, *, norm: str, act: str) -> nn.Sequential:
    """`layers` hidden layers of Linear -> norm -> act, then a Linear to `out`."""
    parts, width = [], inp
    for _ in range(layers):
        parts += [nn.Linear(width, hidden), _mlp_norm(norm, hidden), _ACTIVATIONS[act]()]
        width = hidden
    parts.append(nn.Linear(width, out))
    return nn.Sequential(*parts)


class ResidualBlock(nn.Module):
    """x + norm(conv3x3(act(norm(conv3x3(x))))), then act."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _conv_norm(norm, channels), _ACTIVATIONS[act](),
            nn.Conv2d(channels, channels, 3, padding=1), _conv_norm(norm, channels),
        )
        self.act = _ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(x + self.body(x))


def _kernel_padding(stride: int, smallest: int) -> tuple[int, int]:
    kernel = max(smallest, stride)
    return kernel, (kernel - stride) // 2


class Encoder(nn.Module):
    """(N, 3, H, W) frames in [0, 1], or (N, H/8, W/8) tile ids for "tiles", -> (N, E) embeddings."""

    def __init__(self, cfg: RSSMConfig):
        super().__init__()
        layers, channels = [], 3
        stages = list(zip(cfg.conv_channels, cfg.conv_strides))
        self.tile_embed = None
        if cfg.frame_model == "tiles":  # the stride-8 stage is a lookup: one learned vector per tile id
            channels = cfg.conv_channels[0]
            self.tile_embed = nn.Embedding(cfg.tile_vocab, channels)
            layers += [_conv_norm(cfg.conv_norm, channels), _ACTIVATIONS[cfg.conv_act]()]
            stages = stages[1:]
        for out, stride in stages:
            kernel, padding = _kernel_padding(stride, cfg.conv_kernel)
            layers.append(nn.Conv2d(channels, out, kernel, stride, padding))
            if cfg.conv_residual:
                layers += [_ACTIVATIONS[cfg.conv_act](), ResidualBlock(out, cfg.conv_norm, cfg.conv_act)]
            else:
                layers += [_conv_norm(cfg.conv_norm, out), _ACTIVATIONS[cfg.conv_act]()]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.grid = cfg.coarse_grid()  # e.g. (256, 9, 10)
        flat = math.prod(self.grid)
        self.fc = nn.Linear(flat, cfg.embed_dim) if cfg.embed_dim else nn.Identity()
        self.out_dim = cfg.embed_dim or flat
        self.channels_last = cfg.channels_last
        self.embed_dropout = cfg.embed_dropout
        # the norm and activation after the tile lookup act on each cell's vector alone (not a batch norm): they can
        # act on the table's rows instead, once per tile id rather than once per cell of every frame (the same values)
        self.per_tile_table = cfg.frame_model == "tiles" and cfg.conv_norm != "batch"

    def tile_table(self) -> torch.Tensor:
        """(tile_vocab, C): what the tile lookup, its norm and its activation give each tile id (the table's rows
        passed through them as 1 x 1 maps)."""
        return self.convs[:2](self.tile_embed.weight[:, :, None, None]).flatten(1)

    def forward(self, frames):
        convs = self.convs
        if self.tile_embed is not None:
            if self.per_tile_table and not (self.training and self.embed_dropout > 0):
                frames, convs = F.embedding(frames, self.tile_table()), convs[2:]  # (N, H/8, W/8, C), normed
            else:
                frames = self.tile_embed(frames)  # (N, H/8, W/8, C)
                if self.training and self.embed_dropout > 0:  # whole cells: one draw per tile
                    keep = torch.rand(frames.shape[:-1] + (1,), device=frames.device) >= self.embed_dropout
                    frames = frames * keep / (1 - self.embed_dropout)
            frames = frames.permute(0, 3, 1, 2)  # (N, C, H/8, W/8), channels-last in memory
        elif self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        x = convs(frames)  # (N, C, h, w)
        return self.fc(x.flatten(1))  # (N, E)


class Decoder(nn.Module):
    """(N, F) features -> (N, 3, H, W) frames, or (N, H/8, W/8, tile_vocab) tile logits for "tiles"
    (raw; see `WorldModel.frames_from_output`)."""

    def __init__(self, cfg: RSSMConfig, grid: tuple[int, int, int]):
        super().__init__()
        self.grid = grid
        self.local_width = cfg.local_count() * cfg.classes  # the local latents: the features' last columns
        # the local latents reach the grid through `local` alone, each on its own cell
        self.local = nn.Linear(cfg.local_per_cell * cfg.classes, grid[0]) if self.local_width else None
        feat = cfg.deter + cfg.stoch * cfg.classes - self.local_width
        if cfg.decoder_hidden:
            self.fc = nn.Sequential(nn.Linear(feat, cfg.decoder_hidden), _mlp_norm(cfg.mlp_norm, cfg.decoder_hidden),
                                    _ACTIVATIONS[cfg.mlp_act](), nn.Linear(cfg.decoder_hidden, math.prod(grid)))
        else:
            self.fc = nn.Linear(feat, math.prod(grid))
        # each slot: row logits, column logits, an appearance of the grid's channels (see RSSMConfig.decoder_slots)
        self.slots = nn.Linear(feat, cfg.decoder_slots * (grid[1] + grid[2] + grid[0])) if cfg.decoder_slots else None
        channels = list(reversed(cfg.conv_channels))  # e.g. 256, 128, 64, 32
        strides = list(reversed(cfg.conv_strides))
        layers = [] if cfg.conv_residual else [_conv_norm(cfg.conv_norm, channels[0]), _ACTIVATIONS[cfg.conv_act]()]
        layers += [ResidualBlock(channels[0], cfg.conv_norm, cfg.conv_act) for _ in range(cfg.decoder_blocks)]
        for i, (inp, stride) in enumerate(zip(channels, strides)):
            last = i + 1 == len(channels)
            if last and cfg.frame_model == "tiles":  # at the tile grid: logits over the codebook per cell
                self.tile_head = nn.Linear(inp, cfg.tile_vocab)
                self.broadcast = None
                if cfg.decoder_broadcast:
                    cells = (cfg.image_size[0] // 8, cfg.image_size[1] // 8)
                    self.broadcast = nn.ModuleDict({
                        "inp": nn.Linear(feat, cfg.decoder_broadcast),
                        "out": nn.Sequential(_mlp_norm(cfg.mlp_norm, cfg.decoder_broadcast), _ACTIVATIONS[cfg.mlp_act](),
                                             nn.Linear(cfg.decoder_broadcast, inp))})
                    self.cell_codes = nn.Parameter(torch.randn(*cells, cfg.decoder_broadcast))
                break
            out = 3 if last else channels[i + 1]
            kernel, padding = _kernel_padding(stride, cfg.conv_kernel)
            if cfg.conv_residual:
                layers.append(ResidualBlock(inp, cfg.conv_norm, cfg.conv_act))
            layers.append(nn.ConvTranspose2d(inp, out, kernel, stride, padding))
            if not last:
                if not cfg.conv_residual:
                    layers.append(_conv_norm(cfg.conv_norm, out))
                layers.append(_ACTIVATIONS[cfg.conv_act]())
        self.deconvs = nn.Sequential(*layers)
        self.channels_last = cfg.channels_last
        self.tiles = cfg.frame_model == "tiles"

    def slot_grid(self, feat):
        """(N, F) -> (N, C, h, w): every slot's appearance spread over the grid by its row and column softmaxes."""
        channels, rows, cols = self.grid
        out = self.slots(feat).view(feat.shape[0], -1, rows + cols + channels)  # (N, K, h + w + C)
        row, col = out[..., :rows].softmax(-1), out[..., rows:rows + cols].softmax(-1)
        where = (row[..., :, None] * col[..., None, :]).flatten(2)  # (N, K, h w)
        spread = torch.bmm(where.transpose(1, 2).to(out.dtype), out[..., rows + cols:])  # (N, h w, C)
        return spread.transpose(1, 2).view(-1, channels, rows, cols)

    def coarse(self, feat):
        """(N, F) -> (N, C, h, w): the grid the transposed convolutions start from."""
        local = None
        if self.local is not None:
            feat, local = feat[..., :-self.local_width], feat[..., -self.local_width:]
        x = self.fc(feat).view(-1, *self.grid)
        if local is not None:  # (N, cells, local_per_cell x classes) -> each cell's channels
            x = x + self.local(local.unflatten(-1, (-1, self.local.in_features))).transpose(1, 2).view_as(x)
        if self.slots is not None:
            x = x + self.slot_grid(feat)
        return x

    def forward(self, feat):
        x = self.coarse(feat)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.deconvs(x)
        if self.tiles:  # in channels-last memory the permute is free and the logits come out contiguous
            x = x.permute(0, 2, 3, 1)  # (N, H/8, W/8, C)
            if self.broadcast is not None:  # every cell: its own code + the features, one hidden layer
                x = x + self.broadcast["out"](self.broadcast["inp"](feat)[:, None, None] + self.cell_codes)
            return self.tile_head(x)  # (N, H/8, W/8, V)
        return x.contiguous()  # (N, 3, H, W)


class NormGRUCell(nn.Module):
    """GRU cell with one linear layer on [input, h] and a LayerNorm on its output (DreamerV3's variant).

    blocks > 1: that layer is block-diagonal (`block_weight` (G, (inp + size) / G, 3 size / G)): block g's
    reset / candidate / update gates read only the g-th slices of the input and of h; the LayerNorm after it
    spans all blocks."""

    def __init__(self, inp: int, size: int, blocks: int = 1):
        super().__init__()
        self.blocks = blocks
        if blocks == 1:
            self.linear = nn.Linear(inp + size, 3 * size, bias=False)
        else:
            fan_in = (inp + size) // blocks
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per block
            self.block_weight = nn.Parameter(torch.empty(blocks, fan_in, 3 * size // blocks).uniform_(-bound, bound))
        self.norm = nn.LayerNorm(3 * size)  # over (G, 3, size / G): each block's gates side by side

    def gates(self, x, h):
        """(N, inp), (N, size) -> (N, 3 size) pre-norm gates, laid out (G, [reset, cand, update], size / G)."""
        if self.blocks == 1:
            return self.linear(torch.cat([x, h], -1))
        g = self.blocks
        xh = torch.cat([x.view(-1, g, x.shape[-1] // g), h.view(-1, g, h.shape[-1] // g)], -1)  # (N, G, k)
        return torch.bmm(xh.transpose(0, 1), self.block_weight).transpose(0, 1).reshape(h.shape[0], -1)  # (N, 3 size)

    def forward(self, x, h, out=None):
        """(..., inp), (..., size) -> (..., size); out: a (N, size) tensor (a strided view will do) to write
        the new state into (no autograd)."""
        lead = h.shape[:-1]
        x, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        gates = self.norm(self.gates(x, h)).view(h.shape[0], self.blocks, 3, -1)  # (N, G, 3, size / G)
        reset, cand, update = gates.unbind(2)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)  # biased towards keeping the state
        if out is not None:
            return torch.lerp(h.view_as(cand), cand, update, out=out.view_as(cand)).view_as(out)
        new = torch.lerp(h.view_as(cand), cand.to(h.dtype), update.to(h.dtype))  # update * cand + (1 - update) * h
        return new.reshape(*lead, -1)


def categorical_kl(post_logp, prior_logp):
    """KL(post || prior) of (..., stoch, classes) log-probabilities, summed over latents -> (...)."""
    return (post_logp.exp() * (post_logp - prior_logp)).sum((-2, -1))


def kl_losses(post_logp, prior_logp, free_nats: float):
    """KL balancing with free bits. (..., stoch, classes) log-probs -> (dyn, rep, kl), each (...):
    dyn = max(free, KL(sg(post) || prior)) trains the prior, rep = max(free, KL(post || sg(prior)))
    trains the posterior; kl is the unclipped KL (the same value as both, before clipping)."""
    dyn = categorical_kl(post_logp.detach(), prior_logp)
    rep = categorical_kl(post_logp, prior_logp.detach())
    return dyn.clamp(min=free_nats), rep.clamp(min=free_nats), dyn.detach()


class LocalEmbedIn(nn.Module):
    """The posterior's input from the embedding (the encoder's grid, flat and channel-major) with local latents:
    [Linear(embedding) (hidden), each cell's channels through one shared Linear (cells x channels)]."""

    def __init__(self, embed_dim: int, hidden: int, channels: int):
        super().__init__()
        self.whole = nn.Linear(embed_dim, hidden)
        self.cell = nn.Linear(channels, channels)

    def forward(self, embed):
        cells = embed.unflatten(-1, (self.cell.in_features, -1)).transpose(-1, -2)  # (..., cells, C)
        return torch.cat([self.whole(embed), self.cell(cells).flatten(-2)], -1)


class RSSM(nn.Module):
    """Recurrent state-space model: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]); z_t ~ prior(h_t) or posterior(h_t, e_t)."""

    def __init__(self, cfg: RSSMConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        latent = cfg.stoch * cfg.classes
        self.state_width = cfg.state_latents() * cfg.classes  # the GRU reads z's first columns
        if cfg.gru == "torch":
            self.img_in = nn.Identity()
            self.cell = nn.GRUCell(self.state_width + cfg.num_actions, cfg.deter)
        else:
            self.img_in = nn.Sequential(nn.Linear(self.state_width + cfg.num_actions, cfg.hidden),
                                        _mlp_norm(cfg.mlp_norm, cfg.hidden), _ACTIVATIONS[cfg.mlp_act]())
            self.cell = NormGRUCell(cfg.hidden, cfg.deter, blocks=cfg.gru_blocks)
        self.prior_net = mlp(cfg.deter, cfg.hidden, cfg.prior_layers, latent, norm=cfg.mlp_norm, act=cfg.mlp_act)
        # posterior MLP on [h, embed]; its first layer is split in two so that the embedding half runs
        # once for all T frames (`post_embed_in`) and only the h half runs inside the time loop
        self.local_cells = cfg.local_count() // cfg.local_per_cell  # cells of the coarse grid with local latents
        channels = cfg.coarse_grid()[0]
        self.post_embed_in = (LocalEmbedIn(embed_dim, cfg.hidden, channels) if self.local_cells
                              else nn.Linear(embed_dim, cfg.hidden))
        self.post_h_in = nn.Linear(cfg.deter, cfg.hidden, bias=False)
        self.post_net = nn.Sequential(_mlp_norm(cfg.mlp_norm, cfg.hidden), _ACTIVATIONS[cfg.mlp_act](),
                                      nn.Linear(cfg.hidden, latent - cfg.local_count() * cfg.classes))
        if self.local_cells:  # local latents: each cell's posterior reads its own channels and h
            self.post_local_h = nn.Linear(cfg.deter, channels, bias=False)
            self.post_local = nn.Sequential(_mlp_norm(cfg.mlp_norm, channels), _ACTIVATIONS[cfg.mlp_act](),
                                            nn.Linear(channels, cfg.local_per_cell * cfg.classes))
        self.initial_net = None
        if cfg.initial_from_frame:  # h of a sequence's first frame, from post_embed_in's first `hidden` columns
            self.initial_net = nn.Sequential(_mlp_norm(cfg.mlp_norm, cfg.hidden), _ACTIVATIONS[cfg.mlp_act](),
                                             nn.Linear(cfg.hidden, cfg.deter), nn.Tanh())

    def initial(self, batch: int, device=None):
        """Zero state (h, z): (B, D), (B, S)."""
        cfg = self.cfg
        return torch.zeros(batch, cfg.deter, device=device), torch.zeros(batch, cfg.stoch * cfg.classes, device=device)

    def first_step(self, embed_in, sample: bool, local: bool = True):
        """Posterior of a sequence's first frame, observed without a GRU step, from its projected embedding (B, ...)
        (`post_embed_in`): -> h (zeros, or read from the frame with `initial_from_frame`) (B, D), z (B, S), log-probs
        (`local` False: of the latents before the local ones alone, see `posterior`)."""
        if self.initial_net is None:
            h = self.initial(len(embed_in), embed_in.device)[0]
        else:
            h = self.initial_net(embed_in[..., :self.cfg.hidden])
        logp = self.posterior(h, embed_in, local)
        return h, self.sample(logp, sample), logp

    def log_probs(self, logits):
        """(..., n x classes) raw logits (n: stoch, or fewer) -> (..., n, classes) log-probabilities with `unimix`
        uniform mixed in, in float32 also under bfloat16 autocast (the KL terms are small differences of these)."""
        cfg = self.cfg
        logp = logits.float().view(*logits.shape[:-1], -1, cfg.classes).log_softmax(-1)
        if cfg.unimix > 0:
            logp = ((1 - cfg.unimix) * logp.exp() + cfg.unimix / cfg.classes).log()
        return logp

    def sample(self, logp, sample: bool):
        """(..., stoch, classes) log-probs -> (..., S) one-hot latent with straight-through gradients."""
        if sample and self.cfg.sampler == "gumbel":
            return F.gumbel_softmax(logp, tau=self.cfg.gumbel_tau, hard=True).flatten(-2)
        if sample:  # Gumbel-max: an exact sample of the categorical
            noise = -torch.log(-torch.log(torch.rand_like(logp).clamp_(1e-20, 1.0)))
            index = (logp + noise).argmax(-1)
        else:
            index = logp.argmax(-1)
        onehot = F.one_hot(index, self.cfg.classes).to(logp.dtype)
        if torch.is_grad_enabled() and logp.requires_grad:  # straight-through: forward one-hot, backward probs
            probs = logp.exp()
            onehot = onehot + probs - probs.detach()
        return onehot.flatten(-2)

    def deter_step(self, h, z, action):
        """One GRU step: (B, D), (B, S), (B,) int actions -> (B, D)."""
        a = F.one_hot(action.long(), self.cfg.num_actions).to(z.dtype)
        return self.cell(self.img_in(torch.cat([z[..., :self.state_width], a], -1)), h)

    def img_step(self, h, z, action, sample: bool | None = None, state_only: bool = False):
        """Prior step: -> next h (B, D), z (B, S), prior log-probs (B, stoch, classes); `state_only`: z and
        log-probs of the latents the GRU reads alone (all of them unless local latents are kept out of it)."""
        sample = self.training if sample is None else sample
        h = self.deter_step(h, z, action)
        logp = self.log_probs(self.prior_logits(h, state_only))
        return h, self.sample(logp, sample), logp

    def prior_logits(self, h, state_only: bool = False):
        """The prior's logits (..., S) of h (..., D), or of the latents the GRU reads alone (`state_only`); with
        `local_detached` the local latents' logits, the same values, pass no gradient back to h (in training the
        prior's hidden layers then run twice, on h and on h detached; without gradients, once)."""
        if not (state_only or (self.cfg.local_detached and torch.is_grad_enabled())):
            return self.prior_net(h)
        hidden, out, width = self.prior_net[:-1], self.prior_net[-1], self.state_width
        logits = F.linear(hidden(h), out.weight[:width], out.bias[:width])
        if state_only:
            return logits
        return torch.cat([logits, F.linear(hidden(h.detach()), out.weight[width:], out.bias[width:])], -1)

    def _input_table(self):
        """The first input layer's weights as rows: (S + A, out) for one-hot [z, a] inputs (zero rows for latents the
        GRU does not read), and its bias."""
        layer = self.cell if self.cfg.gru == "torch" else self.img_in[0]
        weight, bias = (layer.weight_ih, layer.bias_ih) if self.cfg.gru == "torch" else (layer.weight, layer.bias)
        rows, unread = weight.t(), self.cfg.stoch * self.cfg.classes - self.state_width
        if unread:
            rows = torch.cat([rows[:self.state_width], rows.new_zeros(unread, rows.shape[1]), rows[self.state_width:]])
        return rows.contiguous(), bias

    def greedy_rollout(self, h, z, actions):
        """The prior alone following each latent's most likely class, for inference (no gradients, no
        sampling): the same states as `img_step(..., sample=False)` in a loop, faster. From (h, z) (B, D),
        (B, S) taking actions (B, H) -> features (B, H, D + S): [h, one-hot z] of each imagined step.

        Faster because a one-hot [z, a] times the input layer is a sum of S/classes + 1 rows of its weight
        (`embedding_bag`), and the most likely class needs no softmax (mixing in `unimix` keeps the order)
        nor torch's argmax (slow over 16 classes on the CPU): the prior's output rows are reordered class-major,
        so the max over classes is a vectorised reduction; (logits >= max) marks the most likely class, its id is
        sum(class * mark), and the one-hot (class == id) is written straight into the feature tensor, as is
        the GRU's new state. A step where two classes tie exactly (several marks) falls back to argmax, which
        keeps the first. On the CPU in float32 (LayerNorm GRU, LayerNorm + SiLU MLPs) the same loop runs compiled,
        `fused` (faster at batch 1024: benchmark.py times both, README "Performance (session 21)"); this
        torch loop elsewhere."""
        if fused.supported(self, h):  # the same loop compiled (fused.cpp), where it applies
            return fused.rollout(self, h, z, actions)
        cfg = self.cfg
        batch, horizon = actions.shape
        latent = cfg.stoch * cfg.classes
        table, bias = self._input_table()
        offsets = torch.arange(cfg.stoch, device=h.device, dtype=h.dtype) * cfg.classes
        class_ids = torch.arange(cfg.classes, device=h.device, dtype=h.dtype)
        class_major = torch.arange(latent, device=h.device).view(cfg.stoch, cfg.classes).t().flatten()
        prior_hidden, prior_out = self.prior_net[:-1], self.prior_net[-1]
        out_weight, out_bias = prior_out.weight[class_major], prior_out.bias[class_major]  # rows (classes, stoch)
        feat = h.new_empty(batch, horizon, cfg.deter + latent)
        onehots = feat[..., cfg.deter:].view(batch, horizon, cfg.stoch, cfg.classes)
        marks = h.new_empty(batch, cfg.classes, cfg.stoch)  # class-major: 1 where a class reaches its latent's max
        class_column = class_ids.view(cfg.classes, 1)
        rows = torch.empty(batch, cfg.stoch + 1, dtype=torch.long, device=h.device)  # [z's rows, the action's]
        action_rows = actions.long() + latent
        index = None
        for t in range(horizon):
            if index is None:  # the start z may be anything (zeros, a soft belief): the plain step
                h = self.deter_step(h, z, actions[:, t])
                feat[:, t, :cfg.deter] = h
            else:
                rows[:, :cfg.stoch] = index
                rows[:, cfg.stoch] = action_rows[:, t]
                x = F.embedding_bag(rows, table, mode="sum").add_(bias)  # (B, out)
                h = self._gru_from_input(x, h, out=feat[:, t, :cfg.deter])
            logits = F.linear(prior_hidden(h), out_weight, out_bias).view(batch, cfg.classes, cfg.stoch)
            torch.ge(logits, logits.amax(1, keepdim=True), out=marks)
            if marks.sum() == batch * cfg.stoch:
                index = marks.mul_(class_column).sum(1)  # (B, stoch) float class ids
            else:  # an exact tie
                index = logits.argmax(1).to(h.dtype)
            torch.eq(index.unsqueeze(-1), class_ids, out=onehots[:, t])
            index += offsets  # row of each latent's class in the input table
        return feat

    def _gru_from_input(self, x, h, out):
        """One GRU step given the input layer's output x (before its norm / nonlinearity), written into out."""
        if self.cfg.gru == "torch":  # nn.GRUCell's gates: reset, update, new
            cell = self.cell
            gh = F.linear(h, cell.weight_hh, cell.bias_hh)
            x_r, x_z, x_n = x.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            new = torch.tanh(x_n + reset * h_n)
            return torch.add(new, update * (h - new), out=out)
        return self.cell(self.img_in[1:](x), h, out=out)

    def posterior(self, h, embed_in, local: bool = True):
        """(..., D) state and (..., hidden) projected embedding (`post_embed_in(embed)`; with local latents also each
        cell's projected channels after it) -> (..., stoch, classes) log-probs; `local` False: of the latents before
        the local ones alone (each latent's log-probs are its own: the rest can be made apart, `local_posterior`)."""
        hidden = self.cfg.hidden
        logp = self.log_probs(self.post_net(self.post_h_in(h) + embed_in[..., :hidden]))
        if self.local_cells and local:
            logp = torch.cat([logp, self.local_posterior(h, embed_in)], -2)
        return logp

    def local_posterior(self, h, embed_in):
        """The local latents' posterior log-probs (..., local_count, classes): each cell's from its own projected
        channels (embed_in's columns after `hidden`) and h."""
        cells = embed_in[..., self.cfg.hidden:].unflatten(-1, (self.local_cells, -1))  # (..., cells, C)
        return self.log_probs(self.post_local(cells + self.post_local_h(h).unsqueeze(-2)).flatten(-2))

    def obs_step(self, h, z, action, embed, sample: bool | None = None):
        """Posterior step given the next frame's embedding (B, E): -> h, z, posterior log-probs."""
        sample = self.training if sample is None else sample
        h = self.deter_step(h, z, action)
        logp = self.posterior(h, self.post_embed_in(embed))
        return h, self.sample(logp, sample), logp

    def observe(self, embeds, actions, state=None, sample: bool | None = None):
        """Posterior over a sequence. embeds (B, T, E); actions (B, T): a_t is taken after frame t.

        Starts with `first_step` (h zeros, or read from the first frame, which is observed without a GRU step), or
        continues from `state` = (h, z, action taken after the state's frame).
        Returns dict: h (B, T, D), z (B, T, S), post_logp / prior_logp (B, T, stoch, classes).
        """
        sample = self.training if sample is None else sample
        steps = embeds.shape[1]
        # (B, T, hidden) (more columns with local latents), and per frame, unbound once: the backward pass then
        # stacks the T gradients once instead of writing each into a zeroed (B, T, .) tensor
        projected = self.post_embed_in(embeds)
        embed_in = projected.unbind(1)
        # local latents the GRU does not read: only h_t decides them besides the frame, so the loop makes the
        # others and the local ones come after it, all T steps in one pass (the same values, fewer and larger ops)
        apart = bool(self.local_cells) and not self.cfg.local_in_state
        hs, zs, post = [], [], []
        if state is None:
            h, z, logp = self.first_step(embed_in[0], sample, local=not apart)
            hs.append(h), zs.append(z), post.append(logp)
            start = 1
        else:
            (h, z, prev_action), start = state, 0
        for t in range(start, steps):
            if t > 0:
                prev_action = actions[:, t - 1]
            h = self.deter_step(h, z, prev_action)
            logp = self.posterior(h, embed_in[t], local=not apart)
            z = self.sample(logp, sample)
            hs.append(h), zs.append(z), post.append(logp)
        h, z, post = torch.stack(hs, 1), torch.stack(zs, 1), torch.stack(post, 1)  # (B, T, .)
        if apart:
            local = self.local_posterior(h, projected)  # (B, T, local_count, classes)
            z, post = torch.cat([z, self.sample(local, sample)], -1), torch.cat([post, local], -2)
        prior_logp = self.log_probs(self.prior_logits(h))  # (B, T, stoch, classes)
        return {"h": h, "z": z, "post_logp": post, "prior_logp": prior_logp}


def psnr(mse):
    """Peak signal-to-noise ratio in dB of per-frame MSEs of [0, 1] images."""
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


def twohot_bins(count: int, extent: float, device=None):
    return torch.linspace(-extent, extent, count, device=device)


def twohot_encode(y, bins):
    """Values (...) -> (..., K) two-hot weights over `bins` (symlog space) whose weighted mean is symlog(y)."""
    x = symlog(y).clamp(bins[0], bins[-1])
    lo = (torch.searchsorted(bins, x.contiguous(), right=True) - 1).clamp(0, len(bins) - 2)
    w_hi = (x - bins[lo]) / (bins[lo + 1] - bins[lo])
    out = torch.zeros(*x.shape, len(bins), device=x.device, dtype=x.dtype)
    out.scatter_(-1, lo.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, (lo + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_decode(logits, bins):
    """(..., K) logits -> (...) expected value, mapped back through symexp."""
    return symexp((logits.softmax(-1) * bins).sum(-1))


def twohot_loss(logits, y, bins):
    """Cross-entropy of (..., K) logits against the two-hot encoding of targets y (...) -> (...)."""
    return -(twohot_encode(y, bins) * logits.float().log_softmax(-1)).sum(-1)  # float32 also under autocast


class ScalarHead(nn.Module):
    """MLP from features to a scalar: plain (MSE) or symlog two-hot (output layer zero-initialised)."""

    def __init__(self, cfg: RSSMConfig, kind: str, layers: int):
        super().__init__()
        self.kind = kind
        width = cfg.twohot_bins if kind == "twohot" else 1
        self.net = mlp(cfg.deter + cfg.stoch * cfg.classes, cfg.head_hidden, layers, width,
                       norm=cfg.mlp_norm, act=cfg.mlp_act)
        if kind == "twohot":
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("bins", twohot_bins(cfg.twohot_bins, cfg.twohot_range), persistent=False)

    def forward(self, feat):
        """(..., F) -> raw output (..., K) or (..., 1)."""
        return self.net(feat)

    def predict(self, feat):
        """(..., F) -> predicted value (...)."""
        out = self.net(feat)
        return twohot_decode(out, self.bins) if self.kind == "twohot" else out.squeeze(-1)

    def loss(self, feat, target):
        """(..., F), (...) -> per-element loss (...)."""
        out = self.net(feat)
        if self.kind == "twohot":
            return twohot_loss(out, target, self.bins)
        return (out.squeeze(-1) - target) ** 2


# how far the camera can move between two consecutive frames (one action): not at all, or one walk step (16 pixels
# = 2 tiles) along x or y
_SCROLLS = ((0, 0), (0, 2), (0, -2), (2, 0), (-2, 0))


def aligned_previous(ids: torch.Tensor) -> torch.Tensor:
    """(B, T, gh, gw) tile ids -> the previous frame's tile ids moved to this frame's camera (B, T, gh, gw),
    by the scroll in `_SCROLLS` under which the fewest cells differ (the first on a tie); -1 at t = 0 and on
    the cells scrolled in."""
    cur, prev = ids[:, 1:], ids[:, :-1]
    gh, gw = ids.shape[-2:]
    moved = torch.full((len(_SCROLLS), *cur.shape), -1, dtype=ids.dtype, device=ids.device)
    for i, (dy, dx) in enumerate(_SCROLLS):  # cur[y, x] shows what prev showed at [y + dy, x + dx]
        moved[i, ..., max(0, -dy):gh - max(0, dy), max(0, -dx):gw - max(0, dx)] = \
            prev[..., max(0, dy):gh - max(0, -dy), max(0, dx):gw - max(0, -dx)]
    counts = ((moved != cur) & (moved >= 0)).sum((-2, -1))  # (scrolls, B, T - 1)
    pick = counts.argmin(0)[None, ..., None, None].expand(1, *cur.shape)  # argmin keeps the first on a tie
    return torch.cat([torch.full_like(ids[:, :1], -1), moved.gather(0, pick)[0]], 1)


def sprite_changes(ids: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, gh, gw) tile ids -> bool (B, T, gh, gw): the cells whose tile differs from the previous frame's
    once the camera's scroll is undone (`aligned_previous`, or its result `prev` when the caller has it): what
    moved against the background. False at t = 0 and on the cells scrolled in."""
    prev = aligned_previous(ids) if prev is None else prev
    return (prev >= 0) & (prev != ids)


class PlaceHead(nn.Module):
    """Features (..., F) -> logits of where the player is: tile x, tile y and map id (one byte each: 256
    classes) and facing (4: RAM's 0 / 4 / 8 / 12 divided by 4); with `RSSMConfig.place_scenes` also whether a battle
    is on and a text box open (2 classes each). Trained on RAM with `RSSMConfig.place_scale`."""

    FIELDS = (("xs", 256), ("ys", 256), ("map_ids", 256), ("facings", 4))
    SCENES = (("in_battles", 2), ("dialog_opens", 2))

    def __init__(self, cfg: RSSMConfig):
        super().__init__()
        self.fields = self.FIELDS + (self.SCENES if cfg.place_scenes else ())
        self.sizes = [size for _, size in self.fields]
        self.width = cfg.deter if cfg.place_input == "deter" else cfg.deter + cfg.stoch * cfg.classes  # read columns
        self.net = mlp(self.width, cfg.head_hidden, 1, sum(self.sizes), norm=cfg.mlp_norm, act=cfg.mlp_act)

    def forward(self, feat) -> dict:
        logits = self.net(feat[..., :self.width]).split(self.sizes, -1)
        return {name: part for (name, _), part in zip(self.fields, logits)}

    def targets(self, places: dict) -> dict:
        """get_batch's (B, T) "xs", "ys", "map_ids", "facings" (and "in_battles", "dialog_opens") -> the heads' class
        ids (facings // 4, kept in 0..3 should a ROM ever leave another value in the facing byte)."""
        return {name: ((places[name] // 4).clamp(0, 3) if name == "facings" else places[name]).long()
                for name, _ in self.fields}

    def loss(self, feat, targets: dict):
        """Sum over the heads of the mean cross-entropy; feat (..., F), targets (...) class ids."""
        logits = self(feat)
        return sum(F.cross_entropy(logits[name].reshape(-1, size), targets[name].reshape(-1))
                   for name, size in self.fields)


class WorldModel(nn.Module):
    """Encoder + RSSM + decoder + reward and continue heads; `forward` returns the training loss."""

    def __init__(self, cfg: RSSMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.rssm = RSSM(cfg, self.encoder.out_dim)
        self.decoder = Decoder(cfg, self.encoder.grid)
        self.tiles = TileCodebook(cfg.tile_vocab, cfg.image_size) if cfg.frame_model == "tiles" else None
        self.reward_head = ScalarHead(cfg, cfg.reward_head, layers=1)
        self.cont_head = mlp(self.feat_dim, cfg.head_hidden, 1, 1, norm=cfg.mlp_norm, act=cfg.mlp_act)
        self.place_head = PlaceHead(cfg) if cfg.place_scale > 0 else None
        self.loss_weights = {
            "recon": cfg.recon_scale, "kl_dyn": cfg.kl_scale * cfg.kl_dyn, "kl_rep": cfg.kl_scale * cfg.kl_rep,
            "reward": cfg.reward_scale, "cont": cfg.continue_scale,
        }
        if cfg.overshoot > 0:
            self.loss_weights["overshoot"] = cfg.kl_scale * cfg.overshoot_scale
        if cfg.place_scale > 0:
            self.loss_weights["place"] = cfg.place_scale
        if cfg.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)

    @property
    def place_keys(self) -> tuple:
        """The RAM bytes (get_batch keys) the place heads learn; () without place heads."""
        return () if self.place_head is None else tuple(name for name, _ in self.place_head.fields)

    @property
    def feat_dim(self) -> int:
        return self.cfg.deter + self.cfg.stoch * self.cfg.classes

    def _encode(self, frames, tile_ids=None):
        """(B, T, 3, H, W) in [0, 1] (or a tiles model's (B, T, H/8, W/8) `tile_ids` of them, made beforehand)
        -> (what the encoder read: the (B*T, 3, H, W) frames or (B*T, H/8, W/8) tile ids; embeddings (B, T, E))."""
        if tile_ids is not None:
            if self.tiles is None:
                raise ValueError("tile_ids given to a world model that reads pixels")
            batch, steps = tile_ids.shape[:2]
            inputs = tile_ids.flatten(0, 1).long()
        else:
            batch, steps = frames.shape[:2]
            inputs = frames.flatten(0, 1)
            if self.tiles is not None:
                inputs = self.tiles.tokenize(inputs)
        return inputs, self.encoder(inputs).view(batch, steps, -1)

    def embed(self, frames):
        """(B, T, 3, H, W) in [0, 1] -> (B, T, E)."""
        return self._encode(frames)[1]

    def decode_raw(self, feat):
        """(B, T, F) -> raw decoder output (B, T, 3, H, W), or tile logits (B, T, H/8, W/8, V)."""
        batch, steps = feat.shape[:2]
        out = self.decoder(feat.flatten(0, 1))
        return out.view(batch, steps, *out.shape[1:])

    def frames_from_output(self, raw):
        """Raw decoder output -> predicted frames (unclamped for "linear"; clamp only to display;
        for "tiles" each cell's probability-weighted mean tile, see `TileCodebook.render_mean`)."""
        if self.tiles is not None:
            batch, steps = raw.shape[:2]
            return self.tiles.render_mean(raw.flatten(0, 1)).view(batch, steps, 3, *self.cfg.image_size)
        return torch.sigmoid(raw) if self.cfg.decoder_output == "sigmoid" else raw + 0.5

    def decode(self, feat):
        """(B, T, F) -> frames (B, T, 3, H, W) clamped to [0, 1]."""
        return self.frames_from_output(self.decode_raw(feat)).clamp(0.0, 1.0)

    def continue_prob(self, feat):
        return torch.sigmoid(self.cont_head(feat).squeeze(-1))

    def forward(self, frames, actions, rewards, continues, tile_ids=None, frame_metrics: bool = True, places=None):
        """Training loss on a batch of windows.

        frames (B, T, 3, H, W) in [0, 1]; actions (B, T) (a_t taken after frame t); rewards, continues (B, T)
        (r_t received for a_t; continues_t = 0 when the episode ended after a_t). A tiles model may be given
        the frames' tile ids (B, T, H/8, W/8) instead (`TileCodebook.tokenize_uint8`, once for a whole
        dataset, so that no step tokenizes); frames are then needed only for `frame_metrics` (recon_mse
        and psnr, which render the most likely tiles, a cost worth skipping on unlogged steps). `places`:
        get_batch's (B, T) "xs", "ys", "map_ids" and "facings" (and "in_battles", "dialog_opens"), needed (and only
        read) when cfg.place_scale > 0.
        Returns (total loss, dict of losses, dict of float metrics, posterior states).
        """
        cfg = self.cfg
        if frame_metrics and frames is None:
            raise ValueError("frame_metrics needs the frames")
        batch, steps = actions.shape
        inputs, embeds = self._encode(frames, tile_ids)  # inputs: frames or tile ids
        states = self.rssm.observe(embeds, actions)
        feat = torch.cat([states["h"], states["z"]], -1)  # (B, T, F)
        # the N frames decoded, rows of the B*T: all of them, or in training a random recon_fraction of them
        picked = slice(None)
        if self.training and cfg.recon_fraction < 1:
            count = max(1, round(cfg.recon_fraction * batch * steps))
            picked = torch.randperm(batch * steps, device=feat.device)[:count]
        raw = self.decoder(feat.flatten(0, 1)[picked])  # (N, ...)
        if frames is not None:
            frames = frames.flatten(0, 1)[picked]  # (N, 3, H, W)
        if self.tiles is not None:  # cross-entropy of each cell's tile, summed (or averaged) over the grid
            # fused.cpp's loss on the CPU, torch's elsewhere
            cell_loss = fused.cross_entropy(raw.reshape(-1, raw.shape[-1]), inputs[picked].flatten())
            cell_loss = cell_loss.view(raw.shape[0], -1)  # (N, cells)
            if cfg.recon_change_weight != 1.0:
                changed = sprite_changes(inputs.view(batch, steps, *inputs.shape[1:])).view(batch * steps, -1)[picked]
                cell_loss = torch.where(changed, cfg.recon_change_weight * cell_loss, cell_loss)
            recon = cell_loss.sum(-1).mean() if cfg.recon_loss == "sum" else cell_loss.mean()
            frame_mse = None
            if frame_metrics:
                with torch.no_grad():  # the metric of the most likely tiles (cheaper than the mean frame)
                    ids = raw[..., :int(self.tiles.size)].argmax(-1)  # (N, H/8, W/8)
                    frame_mse = (self.tiles.render(ids) - frames).pow(2).mean((-3, -2, -1))
        else:
            pred = self.frames_from_output(raw)  # (N, 3, H, W)
            diff = pred - frames
            frame_sse = (diff * diff).sum((-3, -2, -1))  # (N,)
            frame_mse = frame_sse / frames[0].numel()
            recon = frame_mse.mean() if cfg.recon_loss == "mean" else frame_sse.mean()
        post = states["post_logp"]
        dyn, rep, kl = kl_losses(post, states["prior_logp"], cfg.free_nats)  # (B, T) each
        # feat_t is the state reached by a_{t-1}: it predicts r_{t-1} and continues_{t-1}
        next_feat = feat[:, 1:]
        reward_loss = self.reward_head.loss(next_feat, rewards[:, :-1]).mean()
        cont_loss = F.binary_cross_entropy_with_logits(self.cont_head(next_feat).squeeze(-1), continues[:, :-1])
        losses = {
            "recon": recon, "kl_dyn": dyn.mean(), "kl_rep": rep.mean(),
            "reward": reward_loss, "cont": cont_loss,
        }
        targets = None
        if self.place_head is not None:
            if places is None:
                raise ValueError("place_scale > 0 needs the windows' places (get_batch's xs, ys, map_ids, facings)")
            targets = self.place_head.targets(places)
            losses["place"] = self.place_head.loss(feat, targets)
        if cfg.overshoot > 0:
            losses["overshoot"], place = self.overshoot_loss(states, actions, targets)
            if place is not None:  # the open-loop states' places weigh as much as the posterior's
                losses["place"] = losses["place"] + place
        if cfg.place_rollout > 0 and steps > 1:
            losses["place"] = losses["place"] + self.place_rollout_loss(states, actions, targets)
        assert losses.keys() == self.loss_weights.keys(), (losses.keys(), self.loss_weights.keys())
        total = sum(self.loss_weights[k] * v for k, v in losses.items())
        with torch.no_grad():
            reward_pred = self.reward_head.predict(next_feat)
            metrics = {} if frame_mse is None else {
                "recon_mse": frame_mse.mean().item(),
                "psnr": psnr(frame_mse).mean().item(),  # pixels: of the unclamped prediction (a lower bound)
            }
            metrics.update({
                "kl": kl.mean().item(),
                "reward_mse": (reward_pred - rewards[:, :-1]).pow(2).mean().item(),
                "post_entropy": -(post.exp() * post).sum(-1).mean().item(),
            })
        return total, losses, metrics, states

    def overshoot_loss(self, states: dict, actions: torch.Tensor, places: dict | None = None):
        """Latent overshooting: from every posterior state t of each window, roll the prior alone for
        k = 1..cfg.overshoot steps with the logged actions (sampled latents, straight-through) and take
        max(free_nats, KL(sg(posterior_{t+k}) || prior_k)), averaged over every (t, k) inside the window.
        What open-loop imagination needs and the one-step KL never asks for: the prior's own samples
        fed back, k steps deep (gradients also reach the start states). states: observe()'s output;
        actions (B, T). Returns (that KL, None), or with `places` (`PlaceHead.targets`, (B, T) each; a model with
        place heads) (KL, the place heads' loss on every k-step state against the places of frame t + k)."""
        cfg = self.cfg
        batch, steps = actions.shape
        h, z = states["h"], states["z"]  # (B, T, .): row t is the rollout started at frame t
        target = states["post_logp"].detach()
        if cfg.local_detached:  # only the latents the GRU reads are fed back, so only theirs are pulled
            target = target[..., :cfg.state_latents(), :]
        kls, feats, goals = [], [], {name: [] for name in places or ()}
        for k in range(1, min(cfg.overshoot, steps - 1) + 1):
            n = steps - k  # starts 0..n-1 reach frame t + k inside the window
            h, z, prior = self.rssm.img_step(h[:, :n].reshape(batch * n, -1), z[:, :n].reshape(batch * n, -1),
                                             actions[:, k - 1:k - 1 + n].reshape(-1), sample=self.training,
                                             state_only=cfg.local_detached)
            if places is not None:
                feats.append(torch.cat([h, z], -1))
                for name in goals:
                    goals[name].append(places[name][:, k:k + n].reshape(-1))
            h, z = h.view(batch, n, -1), z.view(batch, n, -1)
            goal = target[:, k:k + n].flatten(0, 1)
            kls.append(categorical_kl(goal, prior).clamp(min=cfg.free_nats))
        place = None
        if places is not None and feats:
            place = self.place_head.loss(torch.cat(feats), {name: torch.cat(v) for name, v in goals.items()})
        return torch.cat(kls).mean(), place

    def place_rollout_loss(self, states: dict, actions: torch.Tensor, places: dict):
        """The place heads' loss on deep open-loop states: from each window's first cfg.place_rollout posterior
        states s, the prior alone rolled with the logged actions (sampled latents, straight-through) to the
        window's last frame; the mean over every state s + k of them of the heads' loss against frame s + k's place.
        states: observe()'s output; actions (B, T); places: `PlaceHead.targets`, (B, T) each."""
        batch, steps = actions.shape
        starts = min(self.cfg.place_rollout, steps - 1)
        # rows start-major, so that the starts still inside the window at depth k are the first n * batch rows
        h, z = (states[key][:, :starts].transpose(0, 1).reshape(starts * batch, -1) for key in ("h", "z"))
        feats, goals = [], {name: [] for name in places}
        for k in range(1, steps):
            n = min(starts, steps - k)  # starts 0..n-1 reach frame s + k inside the window
            h, z, _ = self.rssm.img_step(h[:n * batch], z[:n * batch], actions[:, k - 1:k - 1 + n].t().reshape(-1),
                                         sample=self.training)
            feats.append(torch.cat([h, z], -1))
            for name in goals:
                goals[name].append(places[name][:, k:k + n].t().reshape(-1))
        return self.place_head.loss(torch.cat(feats), {name: torch.cat(v) for name, v in goals.items()})


class Actor(nn.Module):
    """Policy on [h, s] (+ `extra_inputs` more, e.g. what the last step changed): 2 hidden layers -> action
    logits (unimix applied by `dist`)."""

    def __init__(self, cfg: RSSMConfig, extra_inputs: int = 0):
        super().__init__()
        self.cfg = cfg
        self.net = mlp(cfg.deter + cfg.stoch * cfg.classes + extra_inputs, cfg.head_hidden, 2, cfg.num_actions,
                       norm=cfg.mlp_norm, act=cfg.mlp_act)

    def forward(self, feat):
        """(..., F) -> (..., A) logits."""
        return self.net(feat)

    def dist(self, feat):
        probs = self.net(feat).softmax(-1)
        if self.cfg.unimix > 0:
            probs = (1 - self.cfg.unimix) * probs + self.cfg.unimix / self.cfg.num_actions
        return torch.distributions.Categorical(probs=probs)


class Critic(nn.Module):
    """Value on [h, s]: 2 hidden layers -> a scalar (MSE) or symlog two-hot, following `reward_head`."""

    def __init__(self, cfg: RSSMConfig):
        super().__init__()
        self.head = ScalarHead(cfg, cfg.reward_head, layers=2)

    def forward(self, feat):
        return self.head(feat)

    def value(self, feat):
        return self.head.predict(feat)

    def loss(self, feat, target):
        return self.head.loss(feat, target)

@dataclass
class StateProbeConfig:
    """A small probe reading the game state off a world model's features [h, s] (checkpoint kind "rssm_probe")."""

    feat_dim: int = 768  # F of the world model it reads (WorldModel.feat_dim)
    hidden: int = 256
    num_maps: int = 256  # map ids are one byte
    tile_scale: float = 16.0  # (x, y) are regressed in tiles / tile_scale

    def __post_init__(self):
        if min(self.feat_dim, self.hidden, self.num_maps) < 1 or self.tile_scale <= 0:
            raise ValueError(f"bad StateProbeConfig {self}")


class StateProbe(nn.Module):
    """Features (..., F) -> (x, y) tile regression (..., 2) and map-id logits (..., num_maps).
    Trained on posterior features against RAM by scripts/evaluate_rssm.py; read by play_dream's HUD."""

    def __init__(self, cfg: StateProbeConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.feat_dim, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.SiLU(),
                                 nn.Linear(cfg.hidden, 2 + cfg.num_maps))

    def forward(self, feat):
        out = self.net(feat)  # (..., 2 + num_maps)
        return out[..., :2] * self.cfg.tile_scale, out[..., 2:]

    def loss(self, feat, xy, map_ids):
        """Smooth-L1 on tiles (..., 2) float plus cross-entropy on map ids (...,) long."""
        pos, logits = self(feat)
        return F.smooth_l1_loss(pos, xy) + F.cross_entropy(logits.flatten(0, -2), map_ids.flatten())


# ===== end v2 =====
