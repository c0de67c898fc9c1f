"""Start from real frames, imagine forward with the RSSM prior, decode; and lambda-returns.

The one place every v2 consumer (demo video, evaluation, play-the-dream, policy training) uses.
Frames here are floats (B, T, 3, H, W) in [0, 1] (`dataset.frames_to_float` makes them from uint8).
Actions follow the data's convention: a_t is the action taken after frame t.

    ctx = observe(wm, frames[:, :K], actions[:, :K])        # posterior over K context frames
    out = imagine(wm, last_state(ctx), actions[:, K-1:K-1+H])  # prior only: H imagined steps
    many = futures(wm, last_state(ctx), actions[:, K-1:K-1+H], 64)  # (B, 64, H, F): 64 sampled futures each
    video = decode(wm, out["feat"])                          # (B, H, 3, H, W) = predictions of frames K..K+H-1
"""
from __future__ import annotations

import torch

from models import WorldModel


def features(states: dict) -> torch.Tensor:
    """[h, z] of a states dict -> (B, T, F)."""
    return torch.cat([states["h"], states["z"]], -1)


@torch.inference_mode()
def observe(wm: WorldModel, frames: torch.Tensor, actions: torch.Tensor, sample: bool = False) -> dict:
    """Posterior belief over context frames (B, K, 3, H, W) with actions (B, K) (the last one, a_{K-1},
    is the action after the last context frame, kept for `last_state`).
    Returns dict h (B, K, D), z (B, K, S), post_logp, prior_logp, feat (B, K, F), last_action (B,)."""
    states = wm.rssm.observe(wm.embed(frames), actions, sample=sample)
    states["feat"] = features(states)
    states["last_action"] = actions[:, -1]
    return states


def last_state(states: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) at the last time step of a states dict: (B, D), (B, S)."""
    return states["h"][:, -1], states["z"][:, -1]


def _rollout(wm: WorldModel, state, actions, sample: bool, reproject: bool = False, keep_map: bool = False) -> dict:
    h, z = state
    if keep_map and not reproject:
        raise ValueError("keep_map gates the reprojected rollout: pass reproject=True with it")
    if keep_map and wm.place_head is None:
        raise ValueError("keep_map reads the model's place heads, and this model has none (place_scale 0)")
    if keep_map and wm.cfg.place_input == "deter":
        raise ValueError("keep_map compares the map the place heads read from two latents, and this model's place "
                         "heads read h alone (place_input='deter')")
    if reproject:
        return _reprojected_rollout(wm, h, z, actions, sample, keep_map)
    if sample or torch.is_grad_enabled():
        hs, zs = [], []
        for t in range(actions.shape[1]):
            h, z, _ = wm.rssm.img_step(h, z, actions[:, t], sample=sample)
            hs.append(h), zs.append(z)
        out = {"h": torch.stack(hs, 1), "z": torch.stack(zs, 1)}  # (B, H, D), (B, H, S)
        out["feat"] = features(out)
    else:
        feat = wm.rssm.greedy_rollout(h, z, actions)  # (B, H, D + S); h and z are views of it
        out = {"h": feat[..., :wm.cfg.deter], "z": feat[..., wm.cfg.deter:], "feat": feat}
    return out


def _reprojected_rollout(wm: WorldModel, h, z, actions, sample: bool, keep_map: bool = False) -> dict:
    """Each step: the prior's latent, decoded to the model's own most likely frame (tile ids for a tiles model,
    the clamped frame otherwise), which the encoder and posterior read again for the step's latent. No real frame
    is read: the rollout stays in imagination, on latents the posterior gives to frames. `keep_map`: where the
    place heads read another map from [h, that latent] than from [h, the prior's latent], the prior's is kept (a
    frame drawn wrongly at a door or a fade is not taken as another map)."""
    rssm, hs, zs = wm.rssm, [], []
    for t in range(actions.shape[1]):
        h, prior_z, _ = rssm.img_step(h, z, actions[:, t], sample=sample)
        raw = wm.decode_raw(torch.cat([h, prior_z], -1).unsqueeze(1))[:, 0]
        frame = _tile_ids(wm, raw) if wm.tiles is not None else wm.frames_from_output(raw).clamp(0.0, 1.0)
        z = rssm.sample(rssm.posterior(h, rssm.post_embed_in(wm.encoder(frame))), sample)
        if keep_map:
            prior_map, map_now = (wm.place_head(torch.cat([h, latent], -1))["map_ids"].argmax(-1)
                                  for latent in (prior_z, z))
            z = torch.where((map_now == prior_map).unsqueeze(-1), z, prior_z)
        hs.append(h), zs.append(z)
    out = {"h": torch.stack(hs, 1), "z": torch.stack(zs, 1)}
    out["feat"] = features(out)
    return out


@torch.inference_mode()
def imagine(wm: WorldModel, state: tuple[torch.Tensor, torch.Tensor], actions: torch.Tensor,
            sample: bool = False, reproject: bool = False, keep_map: bool = False) -> dict:
    """Roll the prior alone from `state` (h, z) = the belief at some frame t, taking actions (B, H)
    (actions[:, 0] = the action after frame t). Returns h, z, feat (B, H, .) for frames t+1..t+H.
    `sample=False` follows each prior's most likely class; True draws samples. `reproject`: each imagined
    latent is decoded to a frame and encoded again by the posterior before it is fed back (slower);
    `keep_map` with it: not where that changes the map the place heads read (`_reprojected_rollout`)."""
    return _rollout(wm, state, actions, sample, reproject, keep_map)


@torch.inference_mode()
def futures(wm: WorldModel, state: tuple[torch.Tensor, torch.Tensor], actions: torch.Tensor, count: int) -> torch.Tensor:
    """`count` futures drawn from the prior from each start state (h, z) (B, D), (B, S), all taking actions (B, H):
    each step's latent a sample of the prior (its unimix included), fed back. -> features (B, count, H, D + S)."""
    h, z = state
    feat = _rollout(wm, (h.repeat_interleave(count, 0), z.repeat_interleave(count, 0)),
                    actions.repeat_interleave(count, 0), sample=True)["feat"]
    return feat.view(len(h), count, *feat.shape[1:])


def _tile_ids(wm: WorldModel, raw: torch.Tensor) -> torch.Tensor:
    """A tiles model's decoder output (..., H/8, W/8, V) -> each cell's most likely tile id (..., H/8, W/8)."""
    return raw[..., :int(wm.tiles.size)].argmax(-1)


@torch.inference_mode()
def decode(wm: WorldModel, feat: torch.Tensor, chunk: int = 64, tile_ids: bool = False):
    """Features (B, T, F) -> frames (B, T, 3, H, W) in [0, 1], decoded `chunk` frames at a time. With `tile_ids`
    (a tiles model): (frames, each cell's most likely tile id (B, T, H/8, W/8)), both from one decoder pass."""
    if tile_ids and wm.tiles is None:
        raise ValueError("tile_ids=True needs a world model with frame_model='tiles'")
    batch, steps = feat.shape[:2]
    flat = feat.reshape(batch * steps, 1, -1)
    frames, ids = [], []
    for i in range(0, flat.shape[0], chunk):
        raw = wm.decode_raw(flat[i:i + chunk].transpose(0, 1))
        frames.append(wm.frames_from_output(raw).clamp(0.0, 1.0))  # = wm.decode
        if tile_ids:
            ids.append(_tile_ids(wm, raw))
    frames = torch.cat(frames, 1).reshape(batch, steps, 3, *wm.cfg.image_size)
    if not tile_ids:
        return frames
    return frames, torch.cat(ids, 1).reshape(batch, steps, *ids[0].shape[2:])


@torch.inference_mode()
def open_loop(wm: WorldModel, frames: torch.Tensor, actions: torch.Tensor, context: int = 1,
              horizon: int | None = None, sample: bool = False, decode_frames: bool = True,
              reproject: bool = False, keep_map: bool = False) -> dict:
    """Observe frames[:, :context], then imagine `horizon` steps with actions[:, context-1:].

    frames (B, T, 3, H, W), actions (B, T). horizon defaults to T - context. Returns dict:
    context (observe() output), imagined (imagine() output, frames context..context+horizon-1),
    recon (B, context, 3, H, W) and pred (B, horizon, 3, H, W) when decode_frames."""
    if horizon is None:
        horizon = frames.shape[1] - context
    if actions.shape[1] < context - 1 + horizon:
        raise ValueError(f"{horizon} imagined steps after {context} context frames need "
                         f"{context - 1 + horizon} actions, got {actions.shape[1]}")
    ctx = observe(wm, frames[:, :context], actions[:, :context])
    imagined = _rollout(wm, last_state(ctx), actions[:, context - 1:context - 1 + horizon], sample, reproject, keep_map)
    out = {"context": ctx, "imagined": imagined}
    if decode_frames:
        out["recon"] = decode(wm, ctx["feat"])
        out["pred"] = decode(wm, imagined["feat"])
    return out


def with_change(feat: torch.Tensor, prev_z: torch.Tensor, deter: int) -> torch.Tensor:
    """[feat, z - prev_z]: a state and what the step into it changed in the latent (nothing, for a press
    into a wall). feat (..., D + S), prev_z (..., S) -> (..., D + 2 S)."""
    return torch.cat([feat, feat[..., deter:] - prev_z], -1)


def imagine_with_policy(wm: WorldModel, actor, state: tuple[torch.Tensor, torch.Tensor], horizon: int,
                        sample: bool = True, prev_z: torch.Tensor | None = None) -> dict:
    """Imagine `horizon` steps choosing actions with `actor` (models.Actor), keeping gradients
    (for actor-critic training; freeze the world model's parameters yourself).

    state (h, z): (B, D), (B, S) start beliefs (detached here). With prev_z (B, S), the latent before the
    start, the actor reads with_change(feat, previous z), else feat = [h, z]. Returns dict:
    feat (B, H+1, F) (index 0 = start), actor_in (B, H, F') what the actor read, actions (B, H) long,
    log_probs (B, H), entropy (B, H), cont (B, H) predicted continue probability after each action
    (rewards: PolicyAgent.imagined_reward of feat)."""
    h, z = (s.detach().clone() for s in state)  # a normal tensor even if `state` came from inference mode
    feats, ins, acts, logps, ents = [torch.cat([h, z], -1)], [], [], [], []
    for _ in range(horizon):
        inp = (feats[-1] if prev_z is None else with_change(feats[-1], prev_z, h.shape[-1])).detach()
        dist = actor.dist(inp)
        action = dist.sample()
        ins.append(inp), logps.append(dist.log_prob(action)), ents.append(dist.entropy()), acts.append(action)
        prev_z = None if prev_z is None else z
        h, z, _ = wm.rssm.img_step(h, z, action, sample=sample)
        feats.append(torch.cat([h, z], -1))
    feat = torch.stack(feats, 1)  # (B, H+1, F)
    return {
        "feat": feat, "actor_in": torch.stack(ins, 1), "actions": torch.stack(acts, 1),
        "log_probs": torch.stack(logps, 1), "entropy": torch.stack(ents, 1), "cont": wm.continue_prob(feat[:, 1:]),
    }


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor,
                   gamma: float = 0.997, lam: float = 0.95) -> torch.Tensor:
    """TD(lambda) returns. rewards (B, H): r_t for the step t -> t+1; continues (B, H): c_t = probability
    the episode goes on after that step; values (B, H+1): v_0..v_H (v_H bootstraps).
    R_t = r_t + gamma * c_t * ((1 - lam) * v_{t+1} + lam * R_{t+1}), with R_H = v_H. Returns (B, H)."""
    horizon = rewards.shape[1]
    if values.shape[1] != horizon + 1 or continues.shape[1] != horizon:
        raise ValueError(f"lambda_returns needs rewards/continues (B, H) and values (B, H+1); got "
                         f"{tuple(rewards.shape)}, {tuple(continues.shape)}, {tuple(values.shape)}")
    out, last = [], values[:, -1]
    for t in reversed(range(horizon)):
        last = rewards[:, t] + gamma * continues[:, t] * ((1 - lam) * values[:, t + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1], 1)
