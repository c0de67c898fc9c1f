"""v1 world model: shapes, scheduled sampling, planner choice, and every v1 script end to end on real
cartridge data (tiny budgets)."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import load_script, run_script
from models import VAE, DynamicsConfig, LatentDynamics, ProbeConfig, RamProbe, VAEConfig
from planner import Goal, LatentPlanner, PlannerPolicy, candidate_macros

torch.set_num_threads(1)


def test_vae_shapes_and_loss():
    for height, width in ((36, 40), (72, 80)):
        vae = VAE(VAEConfig(height=height, width=width))
        frames = torch.rand(3, 3, height, width)
        recon, mu, logvar = vae(frames)
        assert recon.shape == frames.shape and mu.shape == logvar.shape == (3, 32)
        assert 0 <= recon.min() and recon.max() <= 1
        loss, parts = vae.loss(frames)
        assert torch.isfinite(loss) and set(parts) == {"recon", "kl"}


def test_scheduled_sampling_feeds_predictions_back():
    torch.manual_seed(0)
    dynamics = LatentDynamics(DynamicsConfig())
    z, actions = torch.randn(4, 10, 32), torch.randint(0, 8, (4, 10))
    teacher, _ = dynamics.unroll(z, actions, teacher_forcing=1.0)
    free, _ = dynamics.unroll(z, actions, teacher_forcing=0.0)
    rollout, _ = dynamics.rollout(z[:, 0], actions[:, :9])
    assert teacher.shape == free.shape == (4, 9, 32)
    assert torch.allclose(teacher[:, 0], free[:, 0])  # the first step sees z_0 either way
    assert not torch.allclose(teacher[:, 1:], free[:, 1:])  # later steps see predictions, not truth
    assert torch.allclose(free, rollout, atol=1e-6)  # ratio 0 is exactly the open-loop rollout
    # with ratio 0 the true latents after z_0 do not matter at all
    other = z.clone()
    other[:, 1:] = torch.randn(4, 9, 32)
    assert torch.allclose(dynamics.unroll(other, actions, teacher_forcing=0.0)[0], free)


def test_probe_outputs_and_targets():
    probe = RamProbe(ProbeConfig())
    batch = {"xs": torch.tensor([[3, 4]]), "ys": torch.tensor([[5, 6]]), "map_ids": torch.tensor([[1, 2]]),
             "in_battles": torch.tensor([[False, True]]), "dialog_opens": torch.tensor([[True, False]]),
             "party_hps": torch.tensor([[[10.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]]]),
             "party_max_hps": torch.tensor([[[20.0, 0, 0, 0, 0, 0], [20.0, 0, 0, 0, 0, 0]]])}
    targets = RamProbe.targets(batch)
    assert targets["xy"].tolist() == [[3, 5], [4, 6]] and targets["hp"][:, 0].tolist() == [0.5, 0.25]
    loss, parts = probe.loss(torch.randn(2, 32), targets)
    assert torch.isfinite(loss) and set(parts) == {"xy", "map", "battle", "dialog", "hp"}


def _random_planner(seed=0):
    torch.manual_seed(seed)
    return LatentPlanner(VAE(VAEConfig()), LatentDynamics(DynamicsConfig()), RamProbe(ProbeConfig()))


def test_candidate_macros_are_the_originals():
    macros = candidate_macros(15, num_random=5)
    assert macros.shape == (16, 15) and macros.min() >= 0 and macros.max() <= 7
    assert [set(row) for row in macros[:4]] == [{0}, {1}, {2}, {3}]  # straight lines
    assert all(len(set(row)) == 2 for row in macros[4:8])  # zig-zags
    assert set(macros[8]) == {4} and set(macros[9]) == {5}  # A*, B*
    assert set(macros[10]) == {4, 0}  # A then down


def test_score_follows_the_original_rule():
    goal = Goal(map_id=1, x=5, y=5)
    logits = torch.full((4, 256), -10.0)
    logits[:, 1] = 10.0
    logits[3, 1], logits[3, 2] = -10.0, 10.0  # off the goal map
    final = {"xy": torch.tensor([[5.0, 6.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]), "map_logits": logits,
             "battle_logit": torch.tensor([-1.0, -1.0, 1.0, -1.0]), "dialog_logit": torch.tensor([-1.0, 1.0, -1.0, -1.0])}
    assert LatentPlanner.score(final, goal).tolist() == [999.0, 990.0, 950.0, -1000.0]


def test_planner_picks_the_best_scored_candidate():
    planner = _random_planner()
    frame = np.random.default_rng(0).integers(0, 256, (36, 40, 3), dtype=np.uint8)
    goal = Goal(map_id=0, x=3, y=4)
    for path, plan in ((False, planner.plan_mpc(frame, goal)), (True, planner.plan_cem(frame, goal, population=32, iterations=3))):
        assert plan.scores[plan.best] == plan.scores.max()
        assert (plan.actions == plan.candidates[plan.best]).all()
        # re-imagining the chosen sequence gives the reported score (MPC: final latent, CEM: best step)
        _, _, score = planner.evaluate(planner.encode(frame), plan.actions[None], goal, path=path)
        assert score.item() == pytest.approx(plan.scores[plan.best], abs=1e-3)
        assert plan.path_xy.shape == (15, 2) and plan.final_frame.shape == (36, 40, 3)


def test_cem_never_starts_with_a_banned_action():
    planner = _random_planner()
    frame = np.random.default_rng(1).integers(0, 256, (36, 40, 3), dtype=np.uint8)
    plan = planner.plan_cem(frame, Goal(0, 3, 4), population=32, iterations=2, banned_first=frozenset(range(7)))
    assert plan.actions[0] == 7 and plan.scores[plan.best] == plan.scores.max()


def test_policy_bans_a_press_that_changed_nothing_twice():
    planner = _random_planner()
    policy = PlannerPolicy(planner, method="cem", horizon=5, execute_steps=3, plan_kwargs={"population": 16, "iterations": 1})
    policy.reset(Goal(0, 3, 4))
    rng = np.random.default_rng(2)
    frame, moved = (rng.integers(0, 256, (36, 40, 3), dtype=np.uint8) for _ in range(2))
    first = policy.act(frame, None)
    assert policy.stuck.fails == {} and policy.stuck.banned == set()
    still = frame.copy()
    still[0, 0] = 255 - still[0, 0]  # one pixel: under the 3% that counts as a change
    second = policy.act(still, None)  # the same scene after `first`: one failure, from the queued plan
    assert policy.stuck.fails == {first: 1} and policy.stuck.banned == set()
    policy.last_action = first  # `first` pressed again and the frame stays: banned, and replanned at once
    third = policy.act(still, None)
    assert first in policy.stuck.banned and policy.last_plan.actions[0] != first and third != first
    policy.act(moved, None)  # the scene changed: everything may be tried again
    assert policy.stuck.banned == set() and policy.stuck.fails == {}
    assert second in range(8)


def test_path_score_takes_the_best_step_less_its_cost():
    """A plan that stands on the goal at step 2 and walks on beats one that ends a tile short."""
    goal = Goal(map_id=1, x=5, y=5)
    steps = 4
    xy = torch.tensor([[[3.0, 5.0], [5.0, 5.0], [6.0, 5.0], [8.0, 5.0]],  # on the goal at step 2
                       [[2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [4.0, 5.0]]])  # ends one tile short
    logits = torch.full((2, steps, 256), -10.0)
    logits[..., 1] = 10.0
    out = {"xy": xy, "map_logits": logits, "battle_logit": torch.full((2, steps), -1.0),
           "dialog_logit": torch.full((2, steps), -1.0)}
    path = LatentPlanner.score_path(out, goal, step_cost=0.25)
    assert path.tolist() == pytest.approx([1000.0 - 0.5, 999.0 - 0.75])
    final = LatentPlanner.score({k: v[:, -1] for k, v in out.items()}, goal)
    assert final[0] < final[1]  # the original's final-latent score prefers the other one


def test_probe_loss_trains_the_dynamics_not_the_probe():
    torch.manual_seed(0)
    probe = RamProbe(ProbeConfig()).requires_grad_(False)
    dynamics = LatentDynamics(DynamicsConfig(probe_scale=2.0))
    z, actions, rewards = torch.randn(3, 6, 32), torch.randint(0, 8, (3, 6)), torch.zeros(3, 6)
    places = {"xy": torch.randint(0, 20, (3, 6, 2)).float(), "map_id": torch.randint(0, 5, (3, 6))}
    total, parts = dynamics.loss(z, actions, rewards, 0.5, probe, places)
    assert set(parts) == {"latent", "reward", "probe"} and parts["probe"] > 0
    assert total.item() == pytest.approx(parts["latent"] + parts["reward"] + 2.0 * parts["probe"], rel=1e-5)
    total.backward()
    assert dynamics.head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in probe.parameters())
    with pytest.raises(ValueError, match="probe"):
        dynamics.loss(z, actions, rewards, 0.5)
    # probe_scale 0 is the original's loss: the probe is not consulted
    assert set(LatentDynamics(DynamicsConfig()).loss(z, actions, rewards, 0.5, probe, places)[1]) == {"latent", "reward"}


def test_state_heads_and_learned_initial_state():
    torch.manual_seed(0)
    config = DynamicsConfig(init_from_latent=True, state_scale=3.0, num_maps=8)
    dynamics = LatentDynamics(config)
    z, actions, rewards = torch.randn(3, 6, 32), torch.randint(0, 8, (3, 6)), torch.zeros(3, 6)
    assert not torch.allclose(dynamics.initial_state(z[:, 0]), dynamics.initial_state(z[:, 1]))  # h_0 depends on z_0
    places = {"xy": torch.randint(0, 20, (3, 6, 2)).float(), "map_id": torch.randint(0, 8, (3, 6)),
              "facing": torch.randint(0, 4, (3, 6))}
    total, parts = dynamics.loss(z, actions, rewards, 0.5, None, places)
    assert set(parts) == {"latent", "reward", "state"} and parts["state"] > 0
    assert total.item() == pytest.approx(parts["latent"] + parts["reward"] + 3.0 * parts["state"], rel=1e-5)
    total.backward()
    assert dynamics.state_init.weight.grad.abs().sum() > 0 and dynamics.cell.weight_hh.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="facings"):
        dynamics.loss(z, actions, rewards, 0.5, None, {k: v for k, v in places.items() if k != "facing"})


def test_belief_state_is_the_teacher_forced_unroll():
    """observe() along real latents gives the states of a teacher-forced unroll, and a rollout from
    such a state predicts what the unroll predicts at that step."""
    torch.manual_seed(0)
    dynamics = LatentDynamics(DynamicsConfig(init_from_latent=True)).eval()
    z, actions = torch.randn(2, 7, 32), torch.randint(0, 8, (2, 7))
    states = []
    with torch.no_grad():
        pred, _ = dynamics.unroll(z, actions, teacher_forcing=1.0, states=states)
        h = None
        for t in range(4):
            h = dynamics.observe(z[:, t], actions[:, t], h)
            assert torch.allclose(h, states[t], atol=1e-6)
        ahead, _ = dynamics.rollout(z[:, 4], actions[:, 4:6], h0=h)
    assert torch.allclose(ahead[:, 0], pred[:, 4], atol=1e-6)


def test_rollout_feeds_back_the_projected_latent():
    torch.manual_seed(0)
    dynamics = LatentDynamics(DynamicsConfig()).eval()
    z0, actions = torch.randn(2, 32), torch.randint(0, 8, (2, 3))
    with torch.no_grad():
        plain, _ = dynamics.rollout(z0, actions)
        same, _ = dynamics.rollout(z0, actions, project=lambda z: z)
        zeroed, _ = dynamics.rollout(z0, actions, project=torch.zeros_like)
        h = dynamics.observe(z0, actions[:, 0], None)
        second, _, _ = dynamics.step(torch.zeros(2, 32), actions[:, 1], h)
    assert torch.allclose(plain, same) and (zeroed == 0).all()
    assert not torch.allclose(second, plain[:, 1])  # step 2 was fed the projection (zeros), not step 1's latent
    with torch.no_grad():
        fed, _ = dynamics.rollout(z0, actions[:, :2], project=lambda z: z * 0.5)
        _, _, h1 = dynamics.step(z0, actions[:, 0], dynamics.initial_state(z0))
        expected, _, _ = dynamics.step(fed[:, 0], actions[:, 1], h1)
    assert torch.allclose(fed[:, 1], 0.5 * expected, atol=1e-6)


def test_latent_memory_snaps_to_the_nearest_real_latent():
    from errors import UserError
    from latents import LatentMemory

    torch.manual_seed(0)
    bank = torch.randn(50, 32)
    memory = LatentMemory(torch.cat([bank, bank[:10]]))  # duplicates are dropped
    assert len(memory) == 50
    queries = torch.cat([bank[[3, 7]] + 0.01, torch.randn(5, 32)])
    snapped = memory.snap(queries, chunk=3)
    brute = bank[torch.cdist(queries, bank).argmin(1)]
    assert torch.equal(snapped, brute) and torch.equal(snapped[:2], bank[[3, 7]])
    with pytest.raises(UserError, match="empty"):
        LatentMemory(torch.zeros(0, 32))


def test_policy_with_belief_carries_the_state():
    torch.manual_seed(0)
    planner = _random_planner()
    policy = PlannerPolicy(planner, method="cem", horizon=4, execute_steps=1, plan_kwargs={"population": 8, "iterations": 1},
                           belief=True)
    policy.reset(Goal(0, 3, 4))
    frames = np.random.default_rng(3).integers(0, 256, (3, 36, 40, 3), dtype=np.uint8)
    first = policy.act(frames[0], None)
    assert policy.h is None  # nothing observed yet: the plan starts from the frame alone
    policy.act(frames[1], None)
    with torch.no_grad():
        expected = planner.dynamics.observe(planner.encode(frames[0]), torch.tensor([first]), None)
    assert torch.allclose(policy.h, expected, atol=1e-6)
    policy.act(frames[2], None)
    assert not torch.allclose(policy.h, expected)  # updated every real step


# --- every v1 script, end to end, on real collected data ------------------------------------------

def run(script, *args):
    """run_script with one torch thread per process (the test machine has 2 shared cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return run_script(script, *args)


@pytest.fixture(scope="module")
def v1_run(collected_data, tmp_path_factory):
    """VAE -> probe -> dynamics (scheduled sampling, resumed, and the teacher-forcing ablation)."""
    data, out = collected_data("36x40"), tmp_path_factory.mktemp("v1")
    common = ["--data-dir", data, "--device", "cpu", "--seq-len", 10, "--max-files", 1]

    def ok(script, *args):
        done = run(script, *args)
        assert done.returncode == 0, f"{script}: {done.stderr[-3000:]}"
        return done

    ok("train_vae.py", *common, "--epochs", 1, "--batch-size", 64, "--out-dir", out / "vae")
    vae = out / "vae" / "best_vae.pt"
    ok("train_probe.py", *common, "--epochs", 2, "--hidden", 32, "--vae-checkpoint", vae, "--out-dir", out / "probe")
    dyn = [*common, "--vae-checkpoint", vae, "--batch-size", 64, "--hidden", 32]
    ok("train_dynamics.py", *dyn, "--epochs", 1, "--decay-epochs", 2, "--out-dir", out / "ss")
    ok("train_dynamics.py", *dyn, "--epochs", 3, "--decay-epochs", 2, "--out-dir", out / "ss",
       "--resume", out / "ss" / "dynamics_latest.pt")
    ok("train_dynamics.py", *dyn, "--epochs", 1, "--no-scheduled-sampling", "--out-dir", out / "tf")
    probe = out / "probe" / "best_probe.pt"
    ok("train_dynamics.py", *dyn, "--epochs", 2, "--decay-epochs", 1, "--probe-checkpoint", probe, "--probe-scale", 1,
       "--init-from-latent", "--state-scale", 1, "--out-dir", out / "ssp")
    return {"data": data, "out": out, "vae": vae, "probe": out / "probe" / "best_probe.pt",
            "ss": out / "ss" / "best_dynamics.pt", "tf": out / "tf" / "best_dynamics.pt"}


def test_training_outputs(v1_run):
    out = v1_run["out"]
    for name in ("vae", "probe", "ss"):
        for file in ("metrics.json", "metrics.jsonl", "loss_curves.png", "config.json"):
            assert (out / name / file).exists(), f"{name}/{file}"
    assert (out / "vae" / "reconstruction.png").exists()
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    assert len(probe) == 2 and 0 <= probe[-1]["eval/val_map_acc"] <= 1
    # resumed run: epochs 1..3, teacher forcing 1.0 -> 0.6 -> 0.2 (decay over 2 epochs, min 0.2)
    ss = json.loads((out / "ss" / "metrics.json").read_text())
    assert [r["epoch"] for r in ss] == [1, 2, 3]
    assert [r["teacher_forcing"] for r in ss] == pytest.approx([1.0, 0.6, 0.2])
    tf = json.loads((out / "tf" / "metrics.json").read_text())
    assert tf[0]["teacher_forcing"] == 1.0 and math.isfinite(tf[0]["loss/val_ar_latent"])
    # with the probe loss: its terms in training and validation, and the open-loop tile error every epoch
    ssp = json.loads((out / "ssp" / "metrics.json").read_text())
    assert len(ssp) == 2 and all(math.isfinite(r[k]) for r in ssp for k in
                                 ("loss/train_probe", "loss/val_ar_probe", "eval/val_ar_tile_error", "eval/val_tf_tile_error",
                                  "loss/train_state", "loss/val_ar_state"))


def test_evaluate_drift_table(v1_run, tmp_path):
    done = run("evaluate_drift.py", "--data-dir", v1_run["data"], "--vae-checkpoint", v1_run["vae"],
               "--probe-checkpoint", v1_run["probe"], "--checkpoint", v1_run["ss"], "--max-files", 1,
               "--ablation-checkpoint", v1_run["tf"], "--steps", 9, "--out-dir", tmp_path, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in (tmp_path / "drift.md").read_text().splitlines() if line.startswith("| Step ")]
    assert len(rows) == 9 and rows[-1].startswith("| Step 9 |") and rows[0].endswith("× |")
    report = json.loads((tmp_path / "drift.json").read_text())
    for name in ("ss", "tf"):
        for key in ("latent_mse", "tile_error"):
            assert len(report[name][key]) == 9 and all(math.isfinite(v) for v in report[name][key])
    assert (tmp_path / "drift.png").exists()
    # --reproject / --snap: every imagined latent is projected before it is fed back, so the curves change
    for flag, key, words in (("--reproject", "reproject", "re-encoded"), ("--snap", "snap", "nearest training frame")):
        done = run("evaluate_drift.py", "--data-dir", v1_run["data"], "--vae-checkpoint", v1_run["vae"],
                   "--probe-checkpoint", v1_run["probe"], "--checkpoint", v1_run["ss"], "--max-files", 1,
                   "--steps", 9, flag, "--out-dir", tmp_path / key, "--device", "cpu")
        assert done.returncode == 0, done.stderr[-3000:]
        again = json.loads((tmp_path / key / "drift.json").read_text())
        assert again[key] is True and all(math.isfinite(v) for v in again["ss"]["tile_error"])
        assert again["ss"]["latent_mse"] != report["ss"]["latent_mse"] and words in (tmp_path / key / "drift.md").read_text()


def test_user_error_is_one_line_exit_2(v1_run, tmp_path, capsys):
    """More rollout steps than the windows hold: `error: ...` on one line, exit code 2."""
    script = load_script("evaluate_drift")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data-dir", str(v1_run["data"]), "--checkpoint", str(v1_run["ss"]), "--steps", "40",
                     "--out-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --steps 40") and err.count("\n") == 1


def test_run_planner(v1_run, start_state_file, tmp_path):
    done = run("run_planner.py", "--save-state", start_state_file, "--vae-checkpoint", v1_run["vae"],
                      "--probe-checkpoint", v1_run["probe"], "--checkpoint", v1_run["ss"], "--goals", 2,
                      "--max-steps", 6, "--cem-population", 16, "--cem-iterations", 2, "--out-dir", tmp_path, "--device", "cpu",
                      "--start-walk", 30, "--start-states", 2, "--belief", "--snap-data", v1_run["data"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "planner.json").read_text())
    assert set(report["summary"]) == {"mpc", "cem", "greedy", "random"}
    for episodes in report["episodes"].values():
        assert len(episodes) == 2 and all(2 <= e["distance"] <= 10 for e in episodes)
    # the explorer walked 30 actions to make each start state: not the game's first tile (3, 5) any more
    assert any(e["start"] != [3, 5] for e in report["episodes"]["random"])
    table = (tmp_path / "planner.md").read_text()
    assert "| random: random buttons |" in table and "| cem: world model + CEM (belief state, snapped to real frames) |" in table


def test_demo_videos(v1_run, start_state_file, tmp_path):
    done = run("generate_demo_video.py", "--save-state", start_state_file, "--vae-checkpoint", v1_run["vae"],
                      "--checkpoint", v1_run["ss"], "--max-steps", 4, "--out-video", tmp_path / "demo.mp4", "--gif",
                      "--device", "cpu", "--snap-data", v1_run["data"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("generate_planner_demo.py", "--save-state", start_state_file, "--vae-checkpoint", v1_run["vae"],
                      "--probe-checkpoint", v1_run["probe"], "--checkpoint", v1_run["ss"], "--planner", "cem",
                      "--belief", "--snap-data", v1_run["data"], "--max-steps", 4, "--out-video", tmp_path / "plan.mp4", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    import imageio.v2 as imageio

    assert len(imageio.mimread(tmp_path / "demo.gif")) == 5  # start + 4 steps
    for name in ("demo.mp4", "plan.mp4"):
        assert (tmp_path / name).stat().st_size > 1000
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
