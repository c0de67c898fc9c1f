"""Play inside the dream: headless scripted sessions of scripts/play_dream.py on a tiny world model,
in dream and in real mode, the re-sync on Tab, recording, reset, quit, and the probe in the HUD."""
import importlib.util

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import checkpoint
import imagination
from conftest import REPO, run_script
from dataset import frames_to_float
from env import ACTIONS, PokemonEnv
from models import StateProbe, StateProbeConfig

WALK = ["up", "up", "up", "left", "left", "down"]  # from the start: into the Player's House, then about
CONTEXT = 3
SCALE = 2
HUD = 3 * 18 + 6  # the HUD bar's height in pixels (play_dream.HUD_LINE * HUD_LINES + 6)


def load_play_dream():
    spec = importlib.util.spec_from_file_location("play_dream", REPO / "scripts" / "play_dream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean() / 255 ** 2
    return float(-10 * np.log10(mse))


@pytest.fixture(scope="module")
def world_model(collected_data, tmp_path_factory) -> tuple:
    """A tiny RSSM trained for a few steps, and the probe evaluate_rssm.py saves for it."""
    data_dir = collected_data("144x160")
    out = tmp_path_factory.mktemp("play_rssm")
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", out, "--preset", "tiny", "--threads", 1,
                      "--batch-size", 2, "--seq-len", 4, "--epochs", 1, "--steps-per-epoch", 40, "--lr", 3e-3,
                      "--val-batches", 1, "--log-every", 10)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = out / "probe.pt"
    done = run_script("evaluate_rssm.py", "--checkpoints", out / "best_world_model.pt", "--data-dir", data_dir,
                      "--horizon", 2, "--max-sequences", 2, "--probe-windows", 8, "--probe-steps", 20,
                      "--out-dir", out / "eval", "--threads", 1, "--save-probe", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "best_world_model.pt", probe


@pytest.fixture(scope="module")
def sessions(world_model, cartridge_rom, start_state_file, tmp_path_factory) -> dict:
    """Two scripted headless sessions of the same walk: one in the real game that then Tabs back to the
    dream (and records, resets, quits), one that dreams all along without ever re-syncing."""
    wm_path, probe = world_model
    root = tmp_path_factory.mktemp("play")
    scripts = {
        "real": (["--start-mode", "real", "--probe", probe, "--record", root / "clip.mp4"],
                 [*WALK, "tab", "f12", "right", "f12", "r", "esc", "left"]),
        "dream": ([], WALK),
    }
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDL_VIDEODRIVER", "dummy")
        for name, (extra, keys) in scripts.items():
            folder = root / name
            done = run_script("play_dream.py", "--checkpoint", wm_path, "--rom", cartridge_rom, "--save-state",
                              start_state_file, "--context", CONTEXT, "--scale", SCALE, "--threads", 1,
                              "--keys", ",".join(keys), "--out-frames", folder, *extra)
            assert done.returncode == 0, done.stderr[-3000:]
            out[name] = {"dir": folder, **dict(np.load(folder / "frames.npz"))}
    out["clip"] = root / "clip.mp4"
    return out


def test_scripted_sessions_write_one_frame_per_key_at_the_right_size(sessions):
    real, dream = sessions["real"], sessions["dream"]
    # real: start + walk + tab, f12, right, f12, r; "esc" quits, so the "left" after it never runs
    assert len(real["frames"]) == 1 + len(WALK) + 5
    assert len(dream["frames"]) == 1 + len(WALK)
    for run in (real, dream):
        n = len(run["frames"])
        assert run["frames"].shape == (n, 144, 160, 3) and run["frames"].dtype == np.uint8
        assert run["windows"].shape == (n, HUD + 144 * SCALE, 160 * SCALE, 3)
        assert len(list(run["dir"].glob("window_*.png"))) == n
        assert not list(run["dir"].glob(".*")), "a temporary file was left behind"
    assert list(real["keys"]) == ["", *WALK, "tab", "f12", "right", "f12", "r"]
    assert list(real["modes"]) == ["real"] * (1 + len(WALK)) + ["dream"] * 5
    assert list(real["steps"]) == [*range(len(WALK) + 1), len(WALK), len(WALK), len(WALK) + 1, len(WALK) + 1, 0]
    assert set(dream["modes"]) == {"dream"} and list(dream["steps"]) == list(range(len(WALK) + 1))


def test_real_mode_shows_the_emulator_in_lockstep(sessions, cartridge_rom, start_state_file):
    env = PokemonEnv(rom=cartridge_rom, save_states=[start_state_file])
    try:
        env.reset(options={"state_index": 0})
        expected = [env.render()]
        for key in WALK:
            env.step(ACTIONS.index(key))
            expected.append(env.render())
    finally:
        env.close()
    np.testing.assert_array_equal(sessions["real"]["frames"][:len(WALK) + 1], np.stack(expected))
    assert "true:  Player's House" in sessions["real"]["hud"][len(WALK)]
    # R resets both worlds to the save state: the dream re-syncs on the start frame
    assert sessions["real"]["steps"][-1] == 0


def test_tab_back_to_the_dream_resyncs_from_the_real_frames(sessions, world_model):
    real, dream = sessions["real"], sessions["dream"]
    n = len(WALK)
    real_frames = real["frames"][:n + 1]  # (n+1, 144, 160, 3): the true game along the walk
    resynced = real["frames"][n + 1]  # the first dream frame after Tab
    stale = dream["frames"][n]  # the same step in a dream that never re-synced
    wm = checkpoint.build_model(checkpoint.load_checkpoint(world_model[0], kind="rssm"))
    actions = torch.tensor([ACTIONS.index(k) for k in WALK] + [ACTIONS.index("pass")])[None]  # (1, n+1)
    frames = frames_to_float(torch.from_numpy(real_frames)[None], "cpu")  # (1, n+1, 3, 144, 160)

    # the re-synced frame is the posterior over the last CONTEXT real frames, decoded
    ctx = imagination.observe(wm, frames[:, -CONTEXT:], actions[:, -CONTEXT:])
    posterior = imagination.decode(wm, ctx["feat"][:, -1:])[0, 0].permute(1, 2, 0).numpy() * 255
    assert np.abs(resynced - posterior).max() <= 1.0
    # the stale one is the prior alone from the start frame
    rollout = imagination.open_loop(wm, frames, actions, context=1, horizon=n)
    prior = rollout["pred"][0, -1].permute(1, 2, 0).numpy() * 255
    assert np.abs(stale - prior).max() <= 1.0
    assert np.abs(resynced.astype(int) - stale).max() > 0
    # ...and the re-synced frame is closer to the true one than the frame that did not re-sync
    assert psnr(resynced, real_frames[-1]) > psnr(stale, real_frames[-1])


def test_recording_and_the_probe_hud(sessions, world_model):
    clip = iio.imread(sessions["clip"])  # F12, right, F12: the two frames shown while recording
    assert clip.shape == (2, HUD + 144 * SCALE, 160 * SCALE, 3)
    real_hud, dream_hud = sessions["real"]["hud"], sessions["dream"]["hud"]
    assert all("probe: none (pass --probe)" in line for line in dream_hud)
    assert all("probe: " in line and "none" not in line for line in real_hud)
    assert "REC" in real_hud[len(WALK) + 2] and "REC" not in real_hud[len(WALK) + 4]
    probe = checkpoint.build_model(checkpoint.load_checkpoint(world_model[1], kind="rssm_probe"))
    assert isinstance(probe, StateProbe)


def test_bad_keys_and_a_probe_of_another_model_are_refused(world_model, tmp_path, capsys):
    play_dream = load_play_dream()
    with pytest.raises(SystemExit) as exit_info:
        play_dream.main(["--checkpoint", str(world_model[0]), "--keys", "right,jump"])
    assert exit_info.value.code == 2 and "unknown key name(s) jump" in capsys.readouterr().err
    other = StateProbe(StateProbeConfig(feat_dim=5))
    checkpoint.save_checkpoint(tmp_path / "other.pt", kind="rssm_probe", config=vars(other.cfg),
                               model_state=other.state_dict())
    with pytest.raises(SystemExit) as exit_info:
        play_dream.main(["--checkpoint", str(world_model[0]), "--probe", str(tmp_path / "other.pt"), "--keys", "up"])
    assert exit_info.value.code == 2 and "reads 5 features" in capsys.readouterr().err
