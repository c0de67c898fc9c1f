"""Evaluate RSSM checkpoints on held-out episodes: how far can the prior imagine before it drifts?

    python scripts/evaluate_rssm.py --checkpoints checkpoints/faithful/best_world_model.pt \
        checkpoints/rssm_v2/best_world_model.pt --labels faithful default --data-dir data --horizon 50

For each checkpoint: a small probe (MLP) is trained on posterior features [h, s] of the TRAINING
episodes to regress the player's (x, y) tile and classify the map id. On validation episodes
(split by episode, as in training) the model observes --context real frames, then the prior alone
imagines --horizon steps with the logged actions. Per imagined step k = 1..K: the probe's Manhattan
tile error and map-id accuracy on the imagined features, and the PSNR of the decoded frame against
the real one. Also: reconstruction PSNR of the posterior (overall, and on overworld / text-box / battle
frames by the RAM, with each one's share of the squared error), and the probe's error on the posterior;
for a tiles model also which tiles the posterior gets wrong: how many per frame, how many of them on cells
that moved against the background (a character walking or turning, a text box; `models.sprite_changes`),
and how many of those still show the previous frame's tile (a belief that did not take in the change); how
many on cells unlike the place's usual frame (`usual_tiles`: each cell's most common tile at that map, x, y
in the training episodes), and how many of those show the usual tile instead (a character left out); and
the tile error on the quiet windows alone (no battle, text box or map change in any of their frames), and by
what each window holds (`WINDOW_KINDS`: first of all, windows whose last context frame is a battle screen, which
does not show where the player is), with each kind's share of the summed error.
Writes results.json, results.md (one table, checkpoints side by side) and drift.png to --out-dir.
`--probe-latent-noise P` trains the probe with each latent of its inputs randomized with probability P, so
that an imagined state with a few latents off the posterior's is not read as a different place by that alone.
`--reproject` imagines differently: each step's prior latent is decoded to the model's most likely frame, which
the encoder and posterior read again for the latent fed back (still no real frame after the context; as
evaluate_drift.py's --reproject for v1); with `--keep-map` a step keeps the prior's latent where the re-encoded one
would move the map the model's place heads read. `--episodes train` scores the training episodes instead (the same
measures; against the held-out figures, the generalisation gap).
`--futures N` (64 by default; 0: off) also draws N futures per window from the prior (each step's latent sampled
and fed back; the prior alone, also with `--reproject`) and scores one guess from them: the per-coordinate median of the places the probe, and the model's
own place heads, read from the N futures at each step (`median_place_error`); also split by window kind.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import artifacts
import checkpoint
import imagination
from dataset import PokemonDataset, evenly, frames_to_float, window_events
from errors import UserError, cli
from models import StateProbe, StateProbeConfig, aligned_previous, psnr, sprite_changes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="one or more RSSM checkpoints (.pt) to compare")
    p.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint (default: file names)")
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N data chunks")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of episodes held out (as in training)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episode split and the probe")
    p.add_argument("--episodes", choices=("val", "train"), default="val",
                   help="imagine from and score the held-out episodes (val) or the training ones (train)")
    p.add_argument("--horizon", type=int, default=50, help="K: imagined steps to score")
    p.add_argument("--context", type=int, default=1, help="real frames observed before imagining")
    p.add_argument("--max-sequences", type=int, default=256, help="windows of --episodes to imagine from")
    p.add_argument("--probe-windows", type=int, default=1024, help="training windows whose frames train the probe")
    p.add_argument("--probe-steps", type=int, default=3000, help="Adam steps of probe training")
    p.add_argument("--probe-latent-noise", type=float, default=0.0, metavar="P",
                   help="train the probe on posterior features whose categorical latents are each replaced by a "
                        "random class with probability P (a probe that a few wrong latents do not throw; 0: off)")
    p.add_argument("--reproject", action="store_true",
                   help="decode every imagined latent to the model's most likely frame and let the posterior encode "
                        "it again before it is fed back (still no real frame after the context); default: the prior alone")
    p.add_argument("--keep-map", action="store_true",
                   help="with --reproject: keep the prior's latent at a step where the re-encoded one would make the "
                        "model's place heads read another map (needs a model trained with place heads)")
    p.add_argument("--futures", type=int, default=64, metavar="N",
                   help="also draw N futures from the prior per window (the prior alone, also with --reproject) and "
                        "score the per-coordinate median of the places read from them (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--out-dir", default="outputs/eval_rssm", help="where results.json/.md and drift.png go")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--save-probe", default=None, metavar="PATH",
                   help="save the probe trained for the FIRST checkpoint here (kind 'rssm_probe'; play_dream.py --probe)")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise UserError(f"{len(args.labels)} --labels for {len(args.checkpoints)} --checkpoints; give one per checkpoint")
    if args.futures < 0:
        raise UserError(f"--futures {args.futures} is negative; give a number of futures (0: off)")
    if args.horizon < 1 or args.context < 1:
        raise UserError("--horizon and --context must be at least 1")
    if not 0.0 <= args.probe_latent_noise < 1.0:
        raise UserError(f"--probe-latent-noise {args.probe_latent_noise} is not a probability below 1; use e.g. 0.1 (0: off)")
    if args.keep_map and not args.reproject:
        raise UserError("--keep-map gates --reproject's re-encoded latents; pass --reproject with it")
    return args


def posterior_features(wm, ds, starts, batch_size, device) -> tuple[torch.Tensor, dict]:
    """Posterior features (N, T, F) of windows and their RAM targets (x, y, map id)."""
    feats, targets = [], {"xs": [], "ys": [], "map_ids": []}
    for i in range(0, len(starts), batch_size):
        batch = ds.get_batch(starts[i:i + batch_size])
        frames = frames_to_float(batch["obs"], device)
        feats.append(imagination.observe(wm, frames, batch["actions"].to(device))["feat"].cpu())
        for key in targets:
            targets[key].append(batch[key])
    return torch.cat(feats), {k: torch.cat(v) for k, v in targets.items()}


def place_keys(ds, rows: np.ndarray) -> np.ndarray:
    """One int64 per frame row naming its place: (map id, x, y, in battle) from the RAM."""
    a = ds.arrays
    return (((a["map_ids"][rows].astype(np.int64) * 256 + a["xs"][rows]) * 256 + a["ys"][rows]) * 2
            + a["in_battles"][rows])


def usual_tiles(ds, rows: np.ndarray, ids: torch.Tensor, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each place's usual frame: for every place (`place_keys`) of the frame rows given (the training episodes'),
    each cell's most common tile id there (`ids`: every frame's, (N, H/8, W/8)). What differs from it in a frame
    is what the place alone does not say: a character standing elsewhere, a text box. -> (sorted place keys
    (P,), usual ids (P, cells))."""
    places, inverse = np.unique(place_keys(ds, rows), return_inverse=True)
    cells = ids[torch.from_numpy(rows)].flatten(1).numpy().astype(np.int64)  # (n, cells)
    count = cells.shape[1]
    code = ((inverse[:, None] * count + np.arange(count)) * vocab + cells).ravel()  # (place, cell, tile)
    values, counts = np.unique(code, return_counts=True)
    slot = values // vocab
    order = np.lexsort((counts, slot))  # by (place, cell), the most common tile last
    last = np.r_[slot[order][1:] != slot[order][:-1], True]
    return places, (values[order][last] % vocab).reshape(len(places), count)


SCENES = ("overworld", "text box", "battle")  # what a frame shows, from its RAM: battle > text box > overworld


def scene_of(batch: dict) -> torch.Tensor:
    """(B, T) index into SCENES of each frame of a batch."""
    return torch.where(batch["in_battles"], 2, torch.where(batch["dialog_opens"], 1, 0))


# what a scored window holds, each window counted under the first of these that applies: its last context frame is a
# battle screen (which does not show where the player is), a battle later on, a map change, an open text box, none
# of them (the quiet windows)
WINDOW_KINDS = ("battle at the context frame", "battle", "map change", "text box", "quiet")


def window_kinds(batch: dict, context: int) -> torch.Tensor:
    """(B,) index into WINDOW_KINDS of each window of a get_batch dict whose first `context` frames are observed."""
    events = window_events(batch)
    kind = torch.full(events["battle"].shape, WINDOW_KINDS.index("quiet"))
    for name in ("text box", "map change", "battle"):  # a later one wins
        kind[events[name]] = WINDOW_KINDS.index(name)
    kind[batch["in_battles"][:, context - 1].bool()] = WINDOW_KINDS.index("battle at the context frame")
    return kind


def by_window_kind(errors: torch.Tensor, kinds: torch.Tensor) -> dict:
    """Per-window tile errors (N, K) and their kinds (N,) -> {kind: windows, mean tile error per step (None for no
    window), share of the summed tile error per step}."""
    total = errors.sum(0).clamp(min=1e-12)
    out = {}
    for index, name in enumerate(WINDOW_KINDS):
        picked = errors[kinds == index]
        out[name] = {"windows": len(picked), "tile_error": picked.mean(0).tolist() if len(picked) else None,
                     "error_share": (picked.sum(0) / total).tolist()}
    return out


def randomize_latents(feat: torch.Tensor, deter: int, stoch: int, classes: int, p: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Features (N, D + stoch * classes) [h, one-hot z] -> a copy in which each of the stoch latents is, with
    probability p, a one-hot of a class drawn uniformly (h untouched)."""
    z = feat[:, deter:].view(-1, stoch, classes)
    swap = torch.rand(z.shape[:2], generator=generator) < p  # (N, stoch)
    drawn = F.one_hot(torch.randint(classes, z.shape[:2], generator=generator), classes).to(z.dtype)
    return torch.cat([feat[:, :deter], torch.where(swap.unsqueeze(-1), drawn, z).flatten(1)], -1)


def train_probe(feats: torch.Tensor, targets: dict, steps: int, seed: int, latent_noise: float = 0.0,
                layout: tuple[int, int, int] | None = None) -> StateProbe:
    """A StateProbe fitted to posterior features (N, T, F); latent_noise > 0 needs the features' layout
    (deter, stoch, classes) and randomizes that share of each batch's latents (`randomize_latents`)."""
    torch.manual_seed(seed)
    x = feats.flatten(0, 1)  # (N*T, F)
    xy = torch.stack([targets["xs"], targets["ys"]], -1).flatten(0, 1).float()
    maps = targets["map_ids"].flatten()
    probe = StateProbe(StateProbeConfig(feat_dim=x.shape[-1]))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(512, len(x)),), generator=generator)
        inputs = randomize_latents(x[idx], *layout, latent_noise, generator) if latent_noise > 0 else x[idx]
        loss = probe.loss(inputs, xy[idx], maps[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


def median_place_error(read_x: torch.Tensor, read_y: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Places read from N futures, read_x / read_y (B, N, K), against the true (B, K): the Manhattan error of the
    per-coordinate median over the futures (the lower middle one for even N), the single guess that minimises the
    expected Manhattan error under the futures' spread. -> (B, K)."""
    return (read_x.median(1).values - xs).abs() + (read_y.median(1).values - ys).abs()


@torch.no_grad()
def probe_scores(probe: StateProbe, feat: torch.Tensor, xs, ys, maps) -> tuple[torch.Tensor, torch.Tensor]:
    """Manhattan tile error (rounded prediction) and map-id correctness, per element."""
    pos, logits = probe(feat)
    pos = pos.round()
    error = (pos[..., 0] - xs).abs() + (pos[..., 1] - ys).abs()
    return error, (logits.argmax(-1) == maps).float()


def evaluate_checkpoint(path: Path, ds, train_starts, scored_starts, args, device) -> dict:
    ckpt = checkpoint.load_checkpoint(path, kind="rssm")
    wm = checkpoint.build_model(ckpt, device=device)
    if tuple(wm.cfg.image_size) != tuple(ds.resolution):
        raise UserError(f"{path} expects {wm.cfg.image_size[0]}x{wm.cfg.image_size[1]} frames but {args.data_dir} "
                        f"holds {ds.resolution[0]}x{ds.resolution[1]}")
    if args.keep_map and wm.place_head is None:
        raise UserError(f"{path} has no place heads (trained with place_scale 0), which --keep-map reads; "
                        "drop --keep-map for it")
    if args.keep_map and wm.cfg.place_input == "deter":
        raise UserError(f"{path}'s place heads read h alone (place_input='deter'), so --keep-map, which compares the "
                        "map they read from two latents, would change nothing; drop --keep-map for it")
    feats, targets = posterior_features(wm, ds, evenly(train_starts, args.probe_windows), args.batch_size, device)
    layout = (wm.cfg.deter, wm.cfg.stoch, wm.cfg.classes)
    probe = train_probe(feats, targets, args.probe_steps, args.seed, args.probe_latent_noise, layout)
    if args.save_probe and path == Path(args.checkpoints[0]):
        checkpoint.save_checkpoint(args.save_probe, kind="rssm_probe", config=dataclasses.asdict(probe.cfg),
                                   model_state=probe.state_dict(), step=args.probe_steps,
                                   extra={"world_model": str(path), "data_dir": str(args.data_dir)})
        print(f"wrote the probe of {path} to {args.save_probe}", flush=True)

    K, C = args.horizon, args.context
    sums = {"tile_error": torch.zeros(K), "map_acc": torch.zeros(K), "mse": torch.zeros(K), "stay_tile_error": torch.zeros(K)}
    readings = ["probe"]  # the place read from the imagined states: by the probe, by the model's own place heads
    if wm.place_head is not None:  # a model trained with place heads: also what its own heads read (not the probe)
        readings.append("heads")
    if args.futures:  # and the median over futures drawn from the prior, as read by each
        readings += [f"{r} futures" for r in readings]
    reading_errors = {r: [] for r in readings}
    quiet_sums, quiet_count = {"quiet_tile_error": torch.zeros(K), "quiet_stay_tile_error": torch.zeros(K)}, 0
    post_err, post_acc, recon_mse, scenes, count, kinds = [], [], [], [], 0, []
    tile_sums = dict.fromkeys(("frames", "wrong", "frames_right", "changed", "wrong_changed", "stale", "placed_frames",
                               "placed_wrong", "unusual", "wrong_unusual", "usual_drawn"), 0)
    windows = evenly(scored_starts, args.max_sequences)
    steps_in_window = np.arange(C + K)
    if wm.tiles is not None:  # every frame's tile ids (its own codebook's) and each training place's usual frame
        all_ids = wm.tiles.tokenize_uint8(ds.obs)
        places, usual = usual_tiles(ds, np.unique(train_starts[:, None] + steps_in_window), all_ids, wm.cfg.tile_vocab)
    torch.manual_seed(args.seed)  # the futures' draws
    for i in tqdm(range(0, len(windows), args.batch_size), desc=f"imagining ({path.name})", unit="batch"):
        batch = ds.get_batch(windows[i:i + args.batch_size])
        frames = frames_to_float(batch["obs"], device)  # (B, C+K, 3, H, W)
        actions = batch["actions"].to(device)
        out = imagination.open_loop(wm, frames, actions, context=C, horizon=K, reproject=args.reproject,
                                     keep_map=args.keep_map)
        xs, ys, maps = batch["xs"][:, C:].float(), batch["ys"][:, C:].float(), batch["map_ids"][:, C:]
        error, correct = probe_scores(probe, out["imagined"]["feat"].cpu(), xs, ys, maps)  # (B, K)
        frame_mse = (out["pred"] - frames[:, C:]).pow(2).mean((-3, -2, -1)).cpu()  # (B, K)
        sums["tile_error"] += error.sum(0)
        kinds.append(window_kinds(batch, C))
        quiet = kinds[-1] == WINDOW_KINDS.index("quiet")  # no battle, text box or map change in any frame
        sums["map_acc"] += correct.sum(0)
        sums["mse"] += frame_mse.sum(0)
        # the no-move baseline: the player stays on the last context frame's tile
        stay = (xs - batch["xs"][:, C - 1:C].float()).abs() + (ys - batch["ys"][:, C - 1:C].float()).abs()
        sums["stay_tile_error"] += stay.sum(0)
        reading_errors["probe"].append(error)
        if wm.place_head is not None:
            with torch.no_grad():
                read = wm.place_head(out["imagined"]["feat"])
            head_x, head_y = (read[key].argmax(-1).cpu().float() for key in ("xs", "ys"))
            reading_errors["heads"].append((head_x - xs).abs() + (head_y - ys).abs())
        if args.futures:
            many = imagination.futures(wm, imagination.last_state(out["context"]), actions[:, C - 1:C - 1 + K],
                                       args.futures)  # (B, N, K, F)
            with torch.no_grad():
                pos = probe(many.cpu())[0].round()
                reading_errors["probe futures"].append(median_place_error(pos[..., 0], pos[..., 1], xs, ys))
                if wm.place_head is not None:
                    read = wm.place_head(many)
                    reading_errors["heads futures"].append(median_place_error(
                        *(read[key].argmax(-1).cpu().float() for key in ("xs", "ys")), xs, ys))
        count += len(frames)
        quiet_sums["quiet_tile_error"] += error[quiet].sum(0)
        quiet_sums["quiet_stay_tile_error"] += stay[quiet].sum(0)
        quiet_count += int(quiet.sum())
        # the posterior over the whole window: reconstruction quality and what the probe reads from it
        ctx = imagination.observe(wm, frames, actions)
        if wm.tiles is None:
            recon = imagination.decode(wm, ctx["feat"])
        else:  # which tiles the posterior gets wrong: do they move, does it show the last frame's?
            recon, ids = imagination.decode(wm, ctx["feat"], tile_ids=True)
            rows = windows[i:i + args.batch_size][:, None] + steps_in_window  # (B, T) frame rows
            true = all_ids[torch.from_numpy(rows)].long().to(ids.device)  # the frames' tile ids, made once above
            prev = aligned_previous(true)
            wrong, changed = ids != true, sprite_changes(true, prev)
            # against the place's usual frame, on frames at places of the training episodes
            keys = place_keys(ds, rows)  # (B, T)
            index = np.minimum(np.searchsorted(places, keys), len(places) - 1)
            placed = torch.from_numpy(places[index] == keys)  # (B, T)
            at_place = torch.from_numpy(usual[index]).view(ids.shape)
            unusual = (true != at_place) & placed[..., None, None]
            for key, value in (("frames", true.shape[0] * true.shape[1]), ("wrong", wrong.sum()),
                               ("frames_right", (~wrong.flatten(2).any(-1)).sum()), ("changed", changed.sum()),
                               ("wrong_changed", (wrong & changed).sum()), ("stale", (wrong & changed & (ids == prev)).sum()),
                               ("placed_frames", placed.sum()), ("placed_wrong", (wrong & placed[..., None, None]).sum()),
                               ("unusual", unusual.sum()), ("wrong_unusual", (wrong & unusual).sum()),
                               ("usual_drawn", (wrong & unusual & (ids == at_place)).sum())):
                tile_sums[key] += int(value)
        recon_mse.append((recon - frames).pow(2).mean((-3, -2, -1)).flatten().cpu())
        scenes.append(scene_of(batch).flatten())
        e, a = probe_scores(probe, ctx["feat"].cpu(), batch["xs"].float(), batch["ys"].float(), batch["map_ids"])
        post_err.append(e), post_acc.append(a.flatten())  # e: (B, T), by frame of the window
    # PSNR of the mean squared error over all frames: exactly predicted frames (likely with tile tokens)
    # cannot inflate it the way a mean of per-frame PSNRs would
    steps = [{"k": k + 1, **{name: (v[k] / count).item() for name, v in sums.items()}} for k in range(K)]
    reading_errors = {r: torch.cat(v) for r, v in reading_errors.items()}  # each (windows, K)
    window_errors = reading_errors["probe"]  # is the mean a few far-off windows or all of them?
    kinds = torch.cat(kinds)
    shown = kinds != WINDOW_KINDS.index("battle at the context frame")  # windows whose context frame shows the place
    for k, step in enumerate(steps):
        step["tile_error_median"] = window_errors[:, k].median().item()
        step["within_1_tile"] = (window_errors[:, k] <= 1).float().mean().item()
        step["tile_error_place_shown"] = window_errors[shown, k].mean().item() if shown.any() else None
    for reading, name in (("heads", "head_tile_error"), ("probe futures", "tile_error_futures"),
                          ("heads futures", "head_tile_error_futures")):
        if reading in reading_errors:
            for k, step in enumerate(steps):
                step[name] = reading_errors[reading][:, k].mean().item()
    for step in steps:
        step["psnr"] = psnr(torch.tensor(step["mse"])).item()
        for name, v in quiet_sums.items():
            step[name] = (v[step["k"] - 1] / quiet_count).item() if quiet_count else None
    recon_mse, scenes = torch.cat(recon_mse), torch.cat(scenes)
    by_scene = {}
    for index, name in enumerate(SCENES):
        picked = recon_mse[scenes == index]
        by_scene[name] = {"frames": int(len(picked)),
                          "psnr": psnr(picked.mean()).item() if len(picked) else None,
                          "error_share": (picked.sum() / recon_mse.sum().clamp(min=1e-12)).item()}
    post_err = torch.cat(post_err)  # (windows, C + K)
    recon_tiles = None
    if tile_sums["frames"]:
        t = tile_sums
        recon_tiles = {"wrong_per_frame": t["wrong"] / t["frames"], "frames_all_right": t["frames_right"] / t["frames"],
                       "changed_per_frame": t["changed"] / t["frames"],
                       "wrong_on_changes": t["wrong_changed"] / max(t["wrong"], 1),
                       "stale_of_wrong_changes": t["stale"] / max(t["wrong_changed"], 1),
                       "frames_at_training_places": t["placed_frames"] / t["frames"],
                       "unusual_per_frame": t["unusual"] / max(t["placed_frames"], 1),
                       "wrong_on_unusual": t["wrong_unusual"] / max(t["placed_wrong"], 1),
                       "usual_of_wrong_unusual": t["usual_drawn"] / max(t["wrong_unusual"], 1)}
    return {
        "checkpoint": str(path), "preset": wm.cfg.preset, "parameters": sum(p.numel() for p in wm.parameters()),
        "sequences": count, "quiet_sequences": quiet_count, "context": C, "recon_psnr": psnr(recon_mse.mean()).item(),
        "recon_exact_frames": (recon_mse == 0).float().mean().item(), "recon_by_scene": by_scene,
        "recon_tiles": recon_tiles,
        "posterior_tile_error": post_err.mean().item(), "posterior_map_acc": torch.cat(post_acc).mean().item(),
        # the belief imagination starts from: the probe on the posterior at the last context frame (one frame seen
        # when C = 1), against the same window's later frames (more seen)
        "context_tile_error": post_err[:, C - 1].mean().item(), "posterior_tile_error_by_frame": post_err.mean(0).tolist(),
        "steps": steps, "by_window_kind": by_window_kind(window_errors, kinds), "futures": args.futures,
        # the same split for the other readings of the place (the probe's greedy one is by_window_kind)
        "by_window_kind_by_reading": {r: by_window_kind(e, kinds) for r, e in reading_errors.items() if r != "probe"},
    }


def scene_cell(value: dict) -> str:
    if value["psnr"] is None:
        return "no frames"
    return f"{value['psnr']:.2f} dB ({value['frames']} frames, {100 * value['error_share']:.1f}% of the squared error)"


TILE_ROWS = (  # tiles models only: the posterior's most likely tile per cell against the frame's
    ("wrong_per_frame", "posterior: wrong tiles per frame (of 360)"),
    ("frames_all_right", "posterior: frames with every tile right (fraction)"),
    ("changed_per_frame", "tiles per frame that moved against the background (the frames', scroll undone)"),
    ("wrong_on_changes", "posterior: share of its wrong tiles on those moved cells"),
    ("stale_of_wrong_changes", "posterior: share of its wrong moved cells showing the previous frame's tile"),
    ("frames_at_training_places", "frames at a place (map, x, y, battle) of the training episodes (fraction)"),
    ("unusual_per_frame", "... their tiles per frame unlike the place's usual one (the training frames' most common)"),
    ("wrong_on_unusual", "posterior: share of its wrong tiles there on those unusual cells"),
    ("usual_of_wrong_unusual", "posterior: share of its wrong unusual cells showing the place's usual tile"),
)


def markdown(results: dict, horizon: int, episodes: str = "val", reproject: bool = False, keep_map: bool = False) -> str:
    labels = list(results)
    head = ("| k | no-move tile err | " + " | ".join(f"{l} tile err | {l} map acc | {l} PSNR dB" for l in labels)
            + " |")
    rule = "|---|---|" + "---|---|---|" * len(labels)
    lines = [f"# RSSM imagination drift on {'held-out' if episodes == 'val' else 'training'} episodes", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name in [("preset", "preset"), ("parameters", "parameters"), ("sequences", "sequences"),
                      ("recon_psnr", "posterior reconstruction PSNR (dB, of the mean squared error)"),
                      ("recon_exact_frames", "posterior reconstructions exact to the pixel (fraction)"),
                      ("posterior_tile_error", "probe tile error on the posterior"),
                      ("context_tile_error", "... on the posterior at the last context frame (where imagination starts)"),
                      ("posterior_map_acc", "probe map accuracy on the posterior")]:
        cells = [f"{results[l][key]:.3f}" if isinstance(results[l][key], float) else str(results[l][key]) for l in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, name in TILE_ROWS:
        cells = [f"{results[l]['recon_tiles'][key]:.3f}" if results[l].get("recon_tiles") else "-" for l in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for scene in SCENES:
        cells = [scene_cell(results[l]["recon_by_scene"][scene]) for l in labels]
        lines.append(f"| posterior reconstruction PSNR on {scene} frames | " + " | ".join(cells) + " |")
    how = ("each prior latent decoded to the model's most likely frame and encoded again by the posterior (--reproject)"
           if reproject else "prior only")
    if keep_map:
        how += ", the prior's latent kept where the re-encoded one changes the map the place heads read (--keep-map)"
    lines += ["", f"Per imagined step k ({how} after the context frames; no-move: the tile error of guessing that",
              "the player stays where the last context frame shows it, a floor any useful imagination must beat):",
              "", head, rule]
    for k in range(horizon):
        cells = [f"{results[labels[0]]['steps'][k]['stay_tile_error']:.2f}"]
        for l in labels:
            s = results[l]["steps"][k]
            cells.append(f"{s['tile_error']:.2f} | {s['map_acc']:.3f} | {s['psnr']:.2f}")
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    picked = [k for k in (1, 5, 10, 29, 50) if k <= horizon]
    lines += ["", "Tile error on the quiet windows only (no battle, text box or map change in any frame: events the",
              "prior, following its most likely latents, cannot foresee), at steps " + ", ".join(map(str, picked)) + ":", "",
              "| | quiet windows | " + " | ".join(f"k = {k}" for k in picked) + " |", "|---|---|" + "---|" * len(picked)]
    first = results[labels[0]]
    rows = [("no-move", first, "quiet_stay_tile_error")] + [(l, results[l], "quiet_tile_error") for l in labels]
    for name, res, key in rows:
        cells = [f"{res['steps'][k - 1][key]:.2f}" if res["steps"][k - 1][key] is not None else "-" for k in picked]
        lines.append(f"| {name} | {res['quiet_sequences']} of {res['sequences']} | " + " | ".join(cells) + " |")
    if all("by_window_kind" in results[l] for l in labels):
        lines += ["", "Tile error by what the window holds (each window under the first that applies: its last context",
                  "frame a battle screen, which does not show where the player is; a battle later; a map change; a",
                  "text box; none of them), and that kind's share of all windows' summed tile error at steps 29 and 50:",
                  "", "| | kind | windows | " + " | ".join(f"k = {k}" for k in picked) + " | share at k = 29 / 50 |",
                  "|---|---|---|" + "---|" * (len(picked) + 1)]
        late = [k for k in (29, 50) if k <= horizon]
        for l in labels:
            for kind, v in results[l]["by_window_kind"].items():
                errors = [f"{v['tile_error'][k - 1]:.2f}" if v["tile_error"] else "-" for k in picked]
                share = " / ".join(f"{v['error_share'][k - 1]:.2f}" for k in late) or "-"
                lines.append(f"| {l} | {kind} | {v['windows']} | " + " | ".join(errors) + f" | {share} |")
            lines.append(f"| {l} | all but the first kind | | " + " | ".join(
                f"{results[l]['steps'][k - 1]['tile_error_place_shown']:.2f}"
                if results[l]['steps'][k - 1]['tile_error_place_shown'] is not None else "-" for k in picked) + " | |")
    if all("tile_error_median" in results[l]["steps"][0] for l in labels):
        lines += ["", "The spread over windows: the median window's tile error, and the share of windows within 1 tile",
                  "of the player's place, at steps " + ", ".join(map(str, picked)) + ":", "",
                  "| | " + " | ".join(f"k = {k}" for k in picked) + " |", "|---|" + "---|" * len(picked)]
        for l in labels:
            lines.append(f"| {l} | " + " | ".join(
                f"{results[l]['steps'][k - 1]['tile_error_median']:.1f} / {results[l]['steps'][k - 1]['within_1_tile']:.2f}"
                for k in picked) + " |")
    headed = [l for l in labels if "head_tile_error" in results[l]["steps"][0]]
    if headed:
        lines += ["", "Tile error of the model's own place heads (trained on RAM with `place_scale`; the columns above are",
                  "the probe's, trained on posterior features after the fact), at steps " + ", ".join(map(str, picked)) + ":", "",
                  "| | " + " | ".join(f"k = {k}" for k in picked) + " |", "|---|" + "---|" * len(picked)]
        for l in headed:
            lines.append(f"| {l} | " + " | ".join(f"{results[l]['steps'][k - 1]['head_tile_error']:.2f}" for k in picked) + " |")
    futured = [l for l in labels if "tile_error_futures" in results[l]["steps"][0]]
    if futured:
        lines += ["", "Tile error of one guess from many futures: the per-coordinate median of the places read from",
                  "futures drawn from the prior (each step's latent sampled and fed back; `--futures`), by the probe",
                  "and by the model's own place heads, at steps " + ", ".join(map(str, picked)) + ":", "",
                  "| | futures | read by | " + " | ".join(f"k = {k}" for k in picked) + " |",
                  "|---|---|---|" + "---|" * len(picked)]
        for l in futured:
            for key, reader in (("tile_error_futures", "probe"), ("head_tile_error_futures", "place heads")):
                if key in results[l]["steps"][0]:
                    lines.append(f"| {l} | {results[l]['futures']} | {reader} | " + " | ".join(
                        f"{results[l]['steps'][k - 1][key]:.2f}" for k in picked) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for label, res in results.items():
        ks = [s["k"] for s in res["steps"]]
        for ax, key in zip(axes, ("tile_error", "map_acc", "psnr")):
            line, = ax.plot(ks, [s[key] for s in res["steps"]], label=label)
            if key == "tile_error" and "tile_error_futures" in res["steps"][0]:
                ax.plot(ks, [s["tile_error_futures"] for s in res["steps"]], "--", color=line.get_color(),
                        label=f"{label}, median of {res['futures']} futures")
    first = next(iter(results.values()))["steps"]
    axes[0].plot([s["k"] for s in first], [s["stay_tile_error"] for s in first], "k:", label="no-move baseline")
    for ax, title in zip(axes, ("probe tile error (Manhattan)", "map-id accuracy", "frame PSNR (dB)")):
        ax.set_xlabel("imagined step k")
        ax.set_title(title)
        ax.legend(fontsize=8)
    artifacts.save_figure(fig, path)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(checkpoint.resolve_device(args.device))
    ds = PokemonDataset(args.data_dir, seq_len=args.context + args.horizon, max_files=args.max_files)
    train_starts, val_starts = ds.split(args.val_split, seed=args.seed)
    if len(val_starts) == 0 or len(train_starts) == 0:
        raise UserError(f"{args.data_dir}: need training and validation episodes of at least "
                        f"{args.context + args.horizon} steps; lower --horizon or collect more episodes")
    labels = args.labels or [Path(c).parent.name + "/" + Path(c).stem for c in args.checkpoints]
    scored = val_starts if args.episodes == "val" else train_starts
    results = {}
    shown = sorted({min(29, args.horizon), args.horizon})  # the steps printed
    for label, path in zip(labels, args.checkpoints):
        results[label] = evaluate_checkpoint(Path(path), ds, train_starts, scored, args, device)
        steps = results[label]["steps"]
        for k in shown:
            print(f"{label}: step {k}: tile error {steps[k - 1]['tile_error']:.2f}, map acc "
                  f"{steps[k - 1]['map_acc']:.3f}, PSNR {steps[k - 1]['psnr']:.2f} dB", flush=True)
        if results[label]["quiet_sequences"]:
            print(f"{label}: on the {results[label]['quiet_sequences']} quiet windows (no battle, text box or map change): "
                  + ", ".join(f"step {k} {steps[k - 1]['quiet_tile_error']:.2f}" for k in shown)
                  + " tiles", flush=True)
        kinds = results[label]["by_window_kind"]
        print(f"{label}: tile error by window kind, " + ", ".join(f"step {k}" for k in shown) + ": " + "; ".join(
            f"{kind} ({v['windows']}) " + " / ".join(f"{v['tile_error'][k - 1]:.2f}" for k in shown)
            for kind, v in kinds.items() if v["windows"]), flush=True)
        if "head_tile_error" in steps[0]:
            print(f"{label}: its own place heads: " + ", ".join(f"step {k} {steps[k - 1]['head_tile_error']:.2f}" for k in shown)
                  + " tiles", flush=True)
        if args.futures:
            print(f"{label}: the median of {args.futures} futures drawn from the prior, read by the probe: " + ", ".join(
                f"step {k} {steps[k - 1]['tile_error_futures']:.2f}" for k in shown) + (
                "; by its own place heads: " + ", ".join(f"step {k} {steps[k - 1]['head_tile_error_futures']:.2f}"
                                                         for k in shown) if "head_tile_error_futures" in steps[0] else "")
                  + " tiles", flush=True)
        print(f"{label}: posterior reconstruction PSNR {results[label]['recon_psnr']:.2f} dB, probe tile error on the "
              f"posterior {results[label]['posterior_tile_error']:.2f} (at the last context frame "
              f"{results[label]['context_tile_error']:.2f})", flush=True)
        tiles = results[label]["recon_tiles"]
        if tiles:
            print(f"{label}: posterior tiles: {tiles['wrong_per_frame']:.2f} wrong per frame, "
                  f"{tiles['frames_all_right']:.3f} of frames all right; {tiles['wrong_on_changes']:.3f} of the wrong "
                  f"tiles on cells that moved against the background, {tiles['stale_of_wrong_changes']:.3f} of those "
                  f"showing the previous frame's tile; {tiles['wrong_on_unusual']:.3f} of the wrong tiles (at training "
                  f"places) on the {tiles['unusual_per_frame']:.2f} cells per frame unlike the place's usual tile, "
                  f"{tiles['usual_of_wrong_unusual']:.3f} of those showing the usual tile", flush=True)
        print(f"{label}: reconstruction by scene: " + "; ".join(
            f"{scene} {scene_cell(v)}" for scene, v in results[label]["recon_by_scene"].items()), flush=True)
    out = Path(args.out_dir)
    artifacts.write_json(out / "results.json", {"data_dir": str(args.data_dir), "horizon": args.horizon,
                                                "context": args.context, "episodes": args.episodes,
                                                "probe_latent_noise": args.probe_latent_noise,
                                                "reproject": args.reproject, "keep_map": args.keep_map,
                                                "futures": args.futures,
                                                "results": results})
    artifacts.write_text(out / "results.md", markdown(results, args.horizon, args.episodes, args.reproject,
                                                          args.keep_map))
    plot(results, out / "drift.png")
    print(f"wrote {out / 'results.md'}, results.json, drift.png", flush=True)


if __name__ == "__main__":
    main()
