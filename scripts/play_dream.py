"""Play inside the dream: the world model's imagined frame in a window, driven by your keys.

    python scripts/play_dream.py --checkpoint checkpoints/rssm_v2/best_world_model.pt --probe checkpoints/probe.pt

Every key press is one action (as in the data: press 8 frames, run to --ticks-per-action frames).
The real emulator always takes the same actions alongside (lockstep), so Tab can show the true game.

Keys (window)              script name (--keys)   what it does
  arrow keys               up down left right     move (one action)
  Z / X                    z (or a) / x (or b)    A / B
  Enter                    enter (or start)       START
  (no key, --idle-fps > 0) pass                   the "pass" action (nothing pressed)
  Tab                      tab                    switch dream <-> real; the belief is re-synced from the
                                                  true game: observe() over the last --context real frames
  R                        r                      reset real and dream to the save state
  F12                      f12                    start / stop recording the window to --record
  Esc                      esc                    quit

Headless: SDL_VIDEODRIVER=dummy with --keys "right,right,up,tab,left,f12,..." (or a file of such names,
commas, spaces or newlines, # comments) plays the script as fast as it can, then quits, e.g. the README's GIF:

    SDL_VIDEODRIVER=dummy python scripts/play_dream.py --checkpoint CKPT --probe PROBE --record-fps 3 \
        --keys f12,up,up,up,left,left,down,tab,right,right,up,tab,down,down,down,f12 --record /tmp/play_dream.gif
--out-frames DIR writes DIR/frames.npz: frames (N, 144, 160, 3) uint8 = the game frame shown (the dream
decoded as is, nearest-upscaled to 144x160 if the model is smaller; or the emulator's screen), windows
(N, h, w, 3) = the whole window (scaled frame + HUD), modes (N,) "dream"/"real", steps (N,), keys (N,)
(the key that led to the frame; "" for the first), hud (N,) the HUD text; and DIR/window_NNNN.png.
One frame is kept at the start and after every key (and idle step), so N = 1 + the number of keys before esc.
The HUD shows mode, step count, and the --probe's guess of map and tile read off the model's belief
(in real mode also the true values from RAM). A probe comes from scripts/evaluate_rssm.py --save-probe.
"""
from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import artifacts
import checkpoint
import imagination
from dataset import frames_to_float
from env import ACTIONS, DEFAULT_ROM, NATIVE_RESOLUTION, PokemonEnv
from errors import UserError, cli
from game_state import MAP_NAMES, read_state

# script key name -> ("action", index) or a command
KEYS = {
    "down": ("action", ACTIONS.index("down")), "left": ("action", ACTIONS.index("left")),
    "right": ("action", ACTIONS.index("right")), "up": ("action", ACTIONS.index("up")),
    "z": ("action", ACTIONS.index("a")), "a": ("action", ACTIONS.index("a")),
    "x": ("action", ACTIONS.index("b")), "b": ("action", ACTIONS.index("b")),
    "enter": ("action", ACTIONS.index("start")), "start": ("action", ACTIONS.index("start")),
    "pass": ("action", ACTIONS.index("pass")),
    "tab": ("toggle", None), "r": ("reset", None), "f12": ("record", None), "esc": ("quit", None),
}
HUD_LINE = 18  # pixels per HUD text line
HUD_LINES = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/rssm_v2/best_world_model.pt", help="RSSM checkpoint (.pt) to dream with")
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM of the real emulator (default: the open cartridge)")
    p.add_argument("--save-state", default=None, help="PyBoy save state to start and reset from (default: made in memory)")
    p.add_argument("--probe", default=None, help="'rssm_probe' checkpoint for the HUD's map/tile guess (evaluate_rssm.py --save-probe)")
    p.add_argument("--scale", type=int, default=3, help="window pixels per Game Boy pixel")
    p.add_argument("--context", type=int, default=4, help="real frames observe() re-syncs the dream from (Tab back, start, R)")
    p.add_argument("--idle-fps", type=float, default=0.0, help="interactive: 'pass' steps per second while no key is pressed (0: off)")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per action (as in the data)")
    p.add_argument("--start-mode", choices=("dream", "real"), default="dream", help="what the window shows first")
    p.add_argument("--keys", default=None, help="a key script (names above, comma separated) or a file of one; plays it, then quits")
    p.add_argument("--out-frames", default=None, metavar="DIR", help="write the shown frames: DIR/frames.npz and DIR/window_NNNN.png")
    p.add_argument("--record", default="outputs/play_dream.mp4",
                   help="where F12 recordings go (.mp4, or .gif); later ones in a session get _2, _3, ... before the suffix")
    p.add_argument("--record-fps", type=float, default=5.0, help="frames per second of recordings (one frame per key)")
    p.add_argument("--sample", action="store_true", help="dream by sampling the prior's latents (default: most likely class)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.scale < 1 or args.context < 1 or args.ticks_per_action < 2:
        raise UserError("--scale and --context must be at least 1 and --ticks-per-action at least 2")
    if args.idle_fps < 0 or args.record_fps <= 0:
        raise UserError("--idle-fps must be >= 0 and --record-fps > 0")
    args.script = read_keys(args.keys) if args.keys is not None else None
    return args


def read_keys(value: str) -> list[str]:
    """--keys: a file of key names or the names themselves (commas, spaces or newlines between; # comments)."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text()
        except OSError as err:
            raise UserError(f"key script {path} cannot be read ({err.strerror})") from None
    else:
        text = value
    names = " ".join(line.split("#")[0] for line in text.splitlines()).replace(",", " ").lower().split()
    unknown = sorted({n for n in names if n not in KEYS})
    if unknown:
        raise UserError(f"--keys: unknown key name(s) {', '.join(unknown)}; use {', '.join(KEYS)} (see --help)")
    if not names:
        raise UserError(f"--keys {value!r} holds no key names; e.g. --keys right,right,tab,left")
    return names


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(3, H, W) floats in [0, 1] -> (H, W, 3) uint8."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def to_native(frame: np.ndarray) -> np.ndarray:
    """A frame at the model's resolution -> 144x160 (nearest neighbour), unchanged if already native."""
    if frame.shape[:2] == NATIVE_RESOLUTION:
        return frame
    return cv2.resize(frame, NATIVE_RESOLUTION[::-1], interpolation=cv2.INTER_NEAREST)


class DreamSession:
    """The real emulator and the world model's dream, stepped together; what the window shows."""

    def __init__(self, wm, env: PokemonEnv, probe=None, context: int = 4, sample: bool = False, device="cpu"):
        self.wm, self.env, self.probe, self.sample, self.device = wm, env, probe, sample, torch.device(device)
        self.context = context
        self.map_names = MAP_NAMES[env.rom.game]
        self.mode = "dream"
        self.reset()

    # --- the two worlds ----------------------------------------------------------------------------
    def reset(self) -> None:
        obs, _ = self.env.reset(options={"state_index": 0})
        self.real = collections.deque([obs], maxlen=self.context)  # last real frames at the model's resolution
        self.actions = collections.deque(maxlen=self.context - 1)  # actions[i] was taken after real[i]
        self.step_count = 0
        self.resync()

    def resync(self) -> None:
        """The dream's belief from the last real frames: posterior over them (observe), then its frame."""
        frames = frames_to_float(torch.from_numpy(np.stack(self.real))[None], self.device)  # (1, K, 3, H, W)
        acts = torch.tensor([*self.actions, ACTIONS.index("pass")], device=self.device)[None]  # (1, K); last unused
        ctx = imagination.observe(self.wm, frames, acts)
        self.belief = imagination.last_state(ctx)  # (1, D), (1, S)
        self.dream = to_uint8(imagination.decode(self.wm, ctx["feat"][:, -1:])[0, 0])

    def act(self, action: int) -> None:
        obs, *_ = self.env.step(action)
        self.real.append(obs)
        self.actions.append(action)
        self.step_count += 1
        if self.mode == "dream":
            out = imagination.imagine(self.wm, self.belief, torch.tensor([[action]], device=self.device), sample=self.sample)
            self.belief = imagination.last_state(out)
            self.dream = to_uint8(imagination.decode(self.wm, out["feat"])[0, 0])
        else:
            self.resync()  # the belief follows the real game, so the probe reads it there too

    def toggle(self) -> None:
        """Dream <-> real. Either way the belief is re-synced from the real frames: back in the dream it
        imagines on from the true game; in real mode the probe reads the posterior."""
        self.mode = "real" if self.mode == "dream" else "dream"
        self.resync()

    # --- what is shown -----------------------------------------------------------------------------
    def frame(self) -> np.ndarray:
        """The game frame shown now, (144, 160, 3) uint8."""
        return self.env.render() if self.mode == "real" else to_native(self.dream)

    def hud(self, recording: bool) -> list[str]:
        lines = [f"{self.mode.upper()}  step {self.step_count}" + ("  REC" if recording else "")]
        if self.probe is None:
            lines.append("probe: none (pass --probe)")
        else:
            with torch.inference_mode():
                pos, logits = self.probe(torch.cat(self.belief, -1))
            map_id = int(logits[0].argmax())
            x, y = (int(v) for v in pos[0].round())
            lines.append(f"probe: {self.map_names.get(map_id, f'map 0x{map_id:02X}')} x{x} y{y}")
        if self.mode == "real":
            state = read_state(self.env.pyboy, self.env.rom.game)
            lines.append(f"true:  {state.map_name} x{state.x} y{state.y}")
        else:
            lines.append("Tab: real game  R: reset  F12: rec")
        return lines


def compose(frame: np.ndarray, lines: list[str], scale: int) -> np.ndarray:
    """The window image: HUD text bar on top of the frame scaled by `scale` (nearest neighbour)."""
    big = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    bar = np.zeros((HUD_LINE * HUD_LINES + 6, big.shape[1], 3), np.uint8)
    font = 0.4 if scale < 3 else 0.5
    for i, line in enumerate(lines[:HUD_LINES]):
        cv2.putText(bar, line, (6, HUD_LINE * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, big], 0)


class Recorder:
    """F12 recordings (each to its own file, written atomically) and the --out-frames log."""

    def __init__(self, path, fps: float, keep_frames: bool):
        self.path, self.fps, self.keep_frames = Path(path), fps, keep_frames
        self.clip, self.count, self.written = None, 0, []
        self.log = {"frames": [], "windows": [], "modes": [], "steps": [], "keys": [], "hud": []}

    @property
    def recording(self) -> bool:
        return self.clip is not None

    def toggle(self) -> None:
        if self.clip is None:
            self.clip = []
        else:
            self.finish()

    def finish(self) -> None:
        if self.clip:
            self.count += 1
            path = self.path if self.count == 1 else self.path.with_name(f"{self.path.stem}_{self.count}{self.path.suffix}")
            artifacts.write_video(self.clip, path, fps=self.fps)
            self.written.append(path)
            print(f"wrote {path} ({len(self.clip)} frames)", flush=True)
        self.clip = None

    def add(self, window: np.ndarray, frame: np.ndarray, session: DreamSession, key: str, hud: list[str]) -> None:
        if self.clip is not None:
            self.clip.append(window)
        if self.keep_frames:
            for name, value in (("frames", frame), ("windows", window), ("modes", session.mode),
                                ("steps", session.step_count), ("keys", key), ("hud", "\n".join(hud))):
                self.log[name].append(value)

    def write_frames(self, out_dir) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, window in enumerate(self.log["windows"]):
            cv2.imwrite(str(out_dir / f"window_{i:04d}.png"), cv2.cvtColor(window, cv2.COLOR_RGB2BGR))
        arrays = {k: np.stack(v) if k in ("frames", "windows") else np.array(v) for k, v in self.log.items()}
        artifacts.write_arrays(out_dir / "frames.npz", **arrays)
        print(f"wrote {len(self.log['frames'])} frames to {out_dir / 'frames.npz'}", flush=True)


def load_probe(path, feat_dim: int, device):
    if path is None:
        return None
    probe = checkpoint.build_model(checkpoint.load_checkpoint(path, kind="rssm_probe"), device=device)
    if probe.cfg.feat_dim != feat_dim:
        raise UserError(f"probe {path} reads {probe.cfg.feat_dim} features but the world model has {feat_dim}; "
                        f"save a probe for this checkpoint with scripts/evaluate_rssm.py --save-probe")
    return probe


def pygame_keys(pygame) -> dict:
    """pygame key code -> script key name."""
    return {pygame.K_DOWN: "down", pygame.K_LEFT: "left", pygame.K_RIGHT: "right", pygame.K_UP: "up",
            pygame.K_z: "z", pygame.K_x: "x", pygame.K_RETURN: "enter", pygame.K_KP_ENTER: "enter",
            pygame.K_TAB: "tab", pygame.K_r: "r", pygame.K_F12: "f12", pygame.K_ESCAPE: "esc"}


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(checkpoint.resolve_device(args.device))
    wm = checkpoint.build_model(checkpoint.load_checkpoint(args.checkpoint, kind="rssm"), device=device)
    probe = load_probe(args.probe, wm.feat_dim, device)
    env = PokemonEnv(rom=args.rom, save_states=[args.save_state] if args.save_state else None,
                     resolution=tuple(wm.cfg.image_size), ticks_per_action=args.ticks_per_action, episode_length=2**62)
    session = DreamSession(wm, env, probe=probe, context=args.context, sample=args.sample, device=device)
    if args.start_mode == "real":
        session.toggle()
    recorder = Recorder(args.record, args.record_fps, keep_frames=args.out_frames is not None)

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    pygame.display.init()  # the display only: no audio, no fonts (the HUD is drawn with OpenCV)
    height, width = NATIVE_RESOLUTION
    try:
        screen = pygame.display.set_mode((width * args.scale, height * args.scale + HUD_LINE * HUD_LINES + 6))
    except pygame.error as err:
        env.close()
        raise UserError(f"cannot open a window ({err}); without a display run headless with "
                        f"SDL_VIDEODRIVER=dummy and --keys") from None
    pygame.display.set_caption("PokéDreamer: play the dream")

    def show(key: str) -> None:
        frame = session.frame()
        lines = session.hud(recorder.recording)
        window = compose(frame, lines, args.scale)
        screen.blit(pygame.surfarray.make_surface(window.swapaxes(0, 1)), (0, 0))
        pygame.display.flip()
        recorder.add(window, frame, session, key, lines)

    actions_played = 0

    def handle(key: str) -> bool:
        """Apply one key; False when it quits."""
        nonlocal actions_played
        kind, action = KEYS[key]
        if kind == "quit":
            return False
        if kind == "action":
            session.act(action)
            actions_played += 1
        elif kind == "toggle":
            session.toggle()
        elif kind == "reset":
            session.reset()
        elif kind == "record":
            recorder.toggle()
        show(key)
        return True

    show("")
    try:
        if args.script is not None:
            for key in args.script:
                pygame.event.pump()
                if not handle(key):
                    break
        else:
            codes, clock, last_step = pygame_keys(pygame), pygame.time.Clock(), time.monotonic()
            running = True
            while running:
                for event in pygame.event.get():
                    if event.type == pygame.QUIT:
                        running = False
                    elif event.type == pygame.KEYDOWN and event.key in codes:
                        running = handle(codes[event.key]) and running
                        last_step = time.monotonic()
                if running and args.idle_fps > 0 and time.monotonic() - last_step >= 1 / args.idle_fps:
                    handle("pass")
                    last_step = time.monotonic()
                clock.tick(60)
    finally:
        recorder.finish()
        env.close()
        pygame.quit()
    if args.out_frames:
        recorder.write_frames(args.out_frames)
    print(f"played {actions_played} actions", flush=True)


if __name__ == "__main__":
    main()
