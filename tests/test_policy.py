"""The actor-critic learned in imagination (agent.py), train_policy.py, dreamer.py: maths against plain
loops, a non-zero actor gradient, and tiny real runs on the cartridge."""
import json
import shutil
import types

import numpy as np
import pytest
import torch

import agent as agent_lib
import checkpoint
import imagination
from conftest import run_script
from models import RSSMConfig, WorldModel

torch.set_num_threads(1)


def plain_lambda_returns(r, v, c, gamma, lam):
    batch, horizon = len(r), len(r[0])
    out = np.zeros((batch, horizon))
    for b in range(batch):
        following = v[b][horizon]
        for t in reversed(range(horizon)):
            following = r[b][t] + gamma * c[b][t] * ((1 - lam) * v[b][t + 1] + lam * following)
            out[b][t] = following
    return out


def plain_gae(r, v, c, gamma, lam):
    batch, horizon = len(r), len(r[0])
    out = np.zeros((batch, horizon))
    for b in range(batch):
        running = 0.0
        for t in reversed(range(horizon)):
            delta = r[b][t] + gamma * c[b][t] * v[b][t + 1] - v[b][t]
            running = delta + gamma * lam * c[b][t] * running
            out[b][t] = running
    return out


def random_rollout(seed=0, batch=3, horizon=7):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(batch, horizon, generator=g, dtype=torch.float64)
    v = torch.randn(batch, horizon + 1, generator=g, dtype=torch.float64)
    c = (torch.rand(batch, horizon, generator=g, dtype=torch.float64) > 0.2).double()
    return r, v, c


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.997, 1.0), (0.9, 0.0)])
def test_lambda_returns_and_gae_equal_plain_loops(gamma, lam):
    r, v, c = random_rollout()
    ret = imagination.lambda_returns(r, v, c, gamma, lam)
    adv = agent_lib.gae(r, v, c, gamma, lam)
    np.testing.assert_allclose(ret.numpy(), plain_lambda_returns(r.tolist(), v.tolist(), c.tolist(), gamma, lam), atol=1e-10)
    np.testing.assert_allclose(adv.numpy(), plain_gae(r.tolist(), v.tolist(), c.tolist(), gamma, lam), atol=1e-10)
    np.testing.assert_allclose((adv + v[:, :-1]).numpy(), ret.numpy(), atol=1e-10)  # GAE + V = lambda-return


def test_group_advantages_zero_mean_unit_scale():
    outcomes = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.5, 0.5, 0.5, 0.5, -3.0, 4.0, 4.0, 9.0])
    adv = agent_lib.group_advantages(outcomes, group=4).reshape(3, 4)
    for g in (0, 2):
        assert abs(adv[g].mean().item()) < 1e-6
        assert abs(adv[g].std(unbiased=False).item() - 1.0) < 1e-5
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no preference, no NaN
    assert adv[0].argmax() == 3


def test_return_norm_keeps_small_returns_and_scales_large():
    norm = agent_lib.ReturnNorm()
    assert norm.update(torch.linspace(0, 0.3, 100)).item() == 1.0  # max(1, range): small returns unscaled
    big = agent_lib.ReturnNorm(rate=1.0)
    assert abs(big.update(torch.linspace(0, 100, 1001)).item() - 90.0) < 1e-3  # P95 - P5


def tiny_agent(algo, **agent_cfg):
    torch.manual_seed(0)
    cfg = RSSMConfig.from_preset("tiny")
    agent = agent_lib.PolicyAgent(cfg, agent_lib.AgentConfig(algo=algo, horizon=5, group=4, **agent_cfg))
    torch.nn.init.normal_(agent.wm.reward_head.net[-1].weight, std=1.0)  # non-zero imagined rewards
    return agent


@pytest.mark.parametrize("algo,actor_change", [(algo, False) for algo in agent_lib.ALGOS] + [("ppo", True), ("grpo", True)])
def test_actor_loss_gives_nonzero_gradient(algo, actor_change):
    agent = tiny_agent(algo, actor_change=actor_change)
    learner = agent_lib.Learner(agent)
    frames = torch.randint(0, 256, (2, 3, *agent.wm_cfg.image_size, 3), dtype=torch.uint8)
    start = learner.start_states({"obs": frames, "actions": torch.zeros(2, 3, dtype=torch.long)}, "cpu")
    before = [p.detach().clone() for p in agent.actor.parameters()]
    metrics = learner.update(start)
    grads = [p.grad for p in agent.actor.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0, "the actor got no gradient (the original's defect)"
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.actor.parameters()))
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(p.grad is None for p in agent.wm.parameters())  # the world model stays frozen


def test_recent_novelty_counts_tiles_unseen_in_the_last_steps():
    # two sequences; rows are (map, x, y) before each step; a tile is new if not among the last `memory` rows' tiles
    tiles = [(0, 1, 1), (0, 2, 1), (0, 1, 1), (0, 1, 1), (0, 3, 1), (0, 2, 1), (1, 2, 1),  # sequence 0
             (0, 2, 1), (0, 2, 2), (0, 2, 2)]                                              # sequence 1
    maps, xs, ys = (np.array(column, np.uint8) for column in zip(*tiles))
    battle = np.zeros(len(tiles), bool)
    battle[9] = True  # the step onto row 9 ends in battle: never a new tile
    ds = types.SimpleNamespace(arrays={"map_ids": maps, "xs": xs, "ys": ys, "in_battles": battle},
                               segment_ids=np.array([0] * 7 + [1] * 3))
    assert agent_lib.recent_novelty(ds, 1).tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 0, 0]
    assert agent_lib.recent_novelty(ds, 3).tolist() == [1, 0, 0, 1, 1, 1, 0, 1, 0, 0]  # row 1 is 3 rows back from 4
    assert agent_lib.recent_novelty(ds, 100).tolist() == [1, 0, 0, 1, 0, 1, 0, 1, 0, 0]
    with pytest.raises(agent_lib.UserError):
        agent_lib.recent_novelty(ds, 0)


def test_novelty_reward_is_the_head_on_consecutive_states(tmp_path):
    torch.manual_seed(0)
    cfg = RSSMConfig.from_preset("tiny")
    agent = agent_lib.PolicyAgent(cfg, agent_lib.AgentConfig(reward="novelty", horizon=4))
    assert tiny_agent("reinforce").novelty is None  # the default reward is the world model's head
    roll = imagination.imagine_with_policy(agent.wm, agent.actor, agent.wm.rssm.initial(3), 4)
    feat = roll["feat"].detach()
    reward = agent.imagined_reward(feat)
    assert reward.shape == (3, 4) and bool(((reward > 0) & (reward < 1)).all())
    for t in range(4):
        torch.testing.assert_close(reward[:, t], agent.novelty.predict(feat[:, t], feat[:, t + 1]))
    loaded, _ = agent_lib.load_policy(agent_lib.save_policy(tmp_path / "policy.pt", agent))
    assert loaded.cfg.reward == "novelty"
    torch.testing.assert_close(loaded.imagined_reward(feat), reward)
    with pytest.raises(ValueError, match="reward"):
        agent_lib.AgentConfig.from_dict({"reward": "money"})
    loaded.reconfigure(agent_lib.AgentConfig(reward="world-model"))  # continuing with the model's reward
    assert loaded.novelty is None and loaded.cfg.reward == "world-model"
    with pytest.raises(agent_lib.UserError, match="actor_change"):
        loaded.reconfigure(agent_lib.AgentConfig(actor_change=True))


def test_actor_reads_what_the_last_step_changed(tmp_path):
    agent = tiny_agent("reinforce", actor_change=True)
    h, z = agent.wm.rssm.initial(3)
    prev_z = torch.zeros_like(z)
    z = torch.nn.functional.one_hot(torch.arange(3) % agent.wm_cfg.classes, agent.wm_cfg.classes).float().repeat(1, agent.wm_cfg.stoch)
    roll = imagination.imagine_with_policy(agent.wm, agent.actor, (h, z), 4, prev_z=prev_z)
    feat, seen, width = roll["feat"], roll["actor_in"], agent.wm_cfg.deter
    assert seen.shape == (3, 4, feat.shape[-1] + z.shape[-1])
    torch.testing.assert_close(seen[:, 0, feat.shape[-1]:], z - prev_z)
    for t in range(1, 4):
        torch.testing.assert_close(seen[:, t, :feat.shape[-1]], feat[:, t])
        torch.testing.assert_close(seen[:, t, feat.shape[-1]:], feat[:, t, width:] - feat[:, t - 1, width:])
    loaded, _ = agent_lib.load_policy(agent_lib.save_policy(tmp_path / "policy.pt", agent))
    loaded.reset()
    frame = np.zeros((72, 80, 3), np.uint8)
    assert 0 <= loaded.act(frame) < 8 and 0 <= loaded.act(frame) < 8  # first frame: no change; then one


def test_evaluation_from_walked_start_states(cartridge_rom):
    plain = agent_lib.evaluate(None, rom=cartridge_rom, policies=("random",), episodes=2, steps=3, start_state_count=2)
    walked = agent_lib.evaluate(None, rom=cartridge_rom, policies=("random",), episodes=2, steps=3, start_state_count=2,
                                start_walk=40)
    title = {tuple(run["start_tile"]) for run in plain["random"]["episodes"]}
    assert len(title) == 1  # every start state the cartridge makes is the same tile
    assert all(tuple(run["start_tile"]) not in title for run in walked["random"]["episodes"])
    assert walked["random"]["mean"]["unique_tiles"] >= 1


def test_policy_agent_keeps_belief_and_resizes(tmp_path):
    agent = tiny_agent("reinforce")
    path = agent_lib.save_policy(tmp_path / "policy.pt", agent)
    loaded = checkpoint.build_model(checkpoint.load_checkpoint(path, kind="policy"))
    loaded.reset()
    rng = np.random.default_rng(0)
    actions = [loaded.act(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8), deterministic=d) for d in (True, False, True)]
    assert all(0 <= a < 8 for a in actions)
    assert loaded.belief[0].shape == (1, agent.wm_cfg.deter)
    loaded.record_action(5)
    assert loaded.last_action == 5


@pytest.fixture(scope="module")
def tiny_world_model(tmp_path_factory):
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny"))
    path = tmp_path_factory.mktemp("wm") / "checkpoint_latest.pt"
    checkpoint.save_checkpoint(path, kind="rssm", config=wm.cfg.to_dict(), model_state=wm.state_dict(),
                               optimizer_state=torch.optim.Adam(wm.parameters()).state_dict(), step=0,
                               extra={"epoch": 0, "batch_in_epoch": 0, "best_val": float("inf"), "history": [],
                                      "rng": checkpoint.rng_state()})
    return path


def test_train_policy_compare_then_collect_with_the_policy(collected_data, cartridge_rom, tiny_world_model, tmp_path):
    data = collected_data("144x160")
    out = tmp_path / "policy"
    done = run_script("train_policy.py", "--wm-checkpoint", tiny_world_model, "--data-dir", data, "--rom", cartridge_rom,
                      "--out-dir", out, "--compare", "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 2,
                      "--imag-horizon", 4, "--group", 2, "--ppo-epochs", 2, "--eval-episodes", 1, "--eval-steps", 8,
                      "--threads", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((out / "comparison.json").read_text())["rows"]
    assert set(table) == {"reinforce", "ppo", "grpo", "random", "explore"}
    for algo in agent_lib.ALGOS:
        assert (out / algo / "policy.pt").exists() and (out / algo / "eval.md").exists()
    assert (out / "reinforce" / "eval_episode.mp4").stat().st_size > 0
    assert (out / "comparison.md").exists() and (out / "metrics.jsonl").exists()
    ckpt = checkpoint.load_checkpoint(out / "policy.pt", kind="policy")
    assert ckpt["config"]["world_model"]["preset"] == "tiny"  # self-contained
    collected = tmp_path / "by_policy"
    done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", collected, "--total-steps", 20,
                      "--episode-length", 10, "--save-interval", 20, "--policy", "checkpoint", "--checkpoint",
                      out / "policy.pt", "--rand-prob", 0)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(collected / "transitions_0001.npz") as npz:
        assert len(npz["actions"]) == 20


def test_train_policy_with_novelty_reward(collected_data, cartridge_rom, tiny_world_model, tmp_path):
    out = tmp_path / "novelty"
    done = run_script("train_policy.py", "--wm-checkpoint", tiny_world_model, "--data-dir", collected_data("144x160"),
                      "--rom", cartridge_rom, "--out-dir", out, "--reward", "novelty", "--reward-fit-steps", 3, "--actor-change",
                      "--novelty-memory", 5, "--epochs", 1, "--steps-per-epoch", 2, "--batch-size", 2,
                      "--imag-horizon", 4, "--eval-episodes", 1, "--eval-steps", 8, "--no-baselines", "--threads", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fit = next(r for r in records if "novelty_fit/bce" in r)
    assert fit["novelty_memory"] == 5 and fit["novelty_fit/held_out_rows"] > 0
    assert 0 < fit["novelty_fit/target_mean"] < 1 and np.isfinite(fit["novelty_fit/bce"])
    agent, ckpt = agent_lib.load_policy(out / "policy.pt")
    assert agent.cfg.reward == "novelty" and agent.novelty is not None and agent.cfg.actor_change
    assert "novelty.net.0.weight" in ckpt["model_state"]


def test_dreamer_one_iteration(collected_data, cartridge_rom, tiny_world_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(collected_data("144x160"), data)
    out = tmp_path / "dreamer"
    args = ["--data-dir", data, "--out-dir", out, "--rom", cartridge_rom, "--iterations", 1, "--prefill-steps", 630,
            "--episode-length", 30, "--wm-init", tiny_world_model, "--wm-steps", 1, "--wm-batch-size", 2,
            "--policy-updates", 1, "--batch-size", 2, "--imag-horizon", 4, "--eval-episodes", 1, "--eval-steps", 8,
            "--eval-start-states", 1, "--eval-start-walk", 40, "--collect-start-walk", 40,
            "--reward", "novelty", "--reward-fit-steps", 1]
    done = run_script("dreamer.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "dreamer_state.json").read_text())
    assert state["iteration"] == 1 and state["phase"] == "collect"
    assert len(list(data.glob("transitions_*.npz"))) == 3  # 600 fixture steps + 30 collected
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    progress = [r for r in records if "env_steps" in r]
    assert progress and progress[-1]["env_steps"] == 630 and "eval/agent/unique_tiles" in progress[-1]
    assert "eval/explore/unique_tiles" in progress[-1] and progress[-1]["eval/start_walk"] == 40
    baselines = json.loads((out / "baselines.json").read_text())
    assert baselines["settings"]["start_walk"] == 40 and set(baselines["results"]) == {"random", "explore"}
    with np.load(sorted(data.glob("transitions_*.npz"))[-1]) as chunk:  # the 30 collected steps began off the title tile
        first = (int(chunk["map_ids"][0]), int(chunk["xs"][0]), int(chunk["ys"][0]))
    with np.load(sorted(data.glob("transitions_*.npz"))[0]) as chunk:
        title = {(int(m), int(x), int(y)) for m, x, y, s in zip(chunk["map_ids"], chunk["xs"], chunk["ys"],
                                                                 chunk["episode_starts"]) if s}
    assert first not in title
    assert any("novelty_fit/bce" in r for r in records)  # --reward novelty: the head refitted this iteration
    assert state["best"]["iteration"] == 0 and state["best"]["unique_tiles"] == progress[-1]["eval/agent/unique_tiles"]
    for name in ("policy.pt", "best_policy.pt", "progress.png", "progress.md", "policies/policy_iter_000.pt",
                 "world_model/checkpoint_latest.pt"):
        assert (out / name).exists(), name
