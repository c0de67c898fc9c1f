"""Behaviour learned in imagination, and the agent that plays the real game with it.

Training (DreamerV3's actor-critic recipe, on a frozen world model):
    start states  = posterior beliefs of replayed dataset windows (every step of every window)
    rollouts      = the prior alone, actions sampled from the actor, `horizon` steps
    rewards       = the world model's reward head (+ optional intrinsic "surprise": a head that
                    predicts the real posterior/prior KL from a state), continues from its continue head
    targets       = lambda-returns (imagination.lambda_returns) bootstrapped by the critic
    critic        = trained on those returns, regularised towards a slow EMA copy of itself
    actor         = one of three estimators, all on the same imagined batch:
        reinforce   (R - v) / max(1, P95 - P5 of R, EMA)  times log pi  + entropy bonus
        ppo         GAE advantages, same scale; clipped ratio, a few epochs over the batch
        grpo        `group` rollouts from each start state; advantage = the rollout's return
                    normalised within its group (zero mean, unit std); clipped ratio like PPO
Acting (`PolicyAgent`): every real frame (resized to the encoder's size if needed) updates the belief
with the action actually taken; the actor reads the belief. A "policy" checkpoint holds the world
model's config and weights with the actor and critic, so it is self-contained:
    agent = checkpoint.build_model(checkpoint.load_checkpoint("policy.pt", kind="policy"))
    agent.reset(); action = agent.act(obs_uint8, deterministic=True)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import artifacts
import checkpoint
import imagination
from dataset import frames_to_float
from errors import UserError
from models import Actor, Critic, RSSMConfig, WorldModel, categorical_kl, mlp

ALGOS = ("reinforce", "ppo", "grpo")
REWARDS = ("world-model", "novelty")


@dataclass
class AgentConfig:
    """Every choice of the actor-critic. Defaults: DreamerV3 (anchors.md) except gamma 0.99 and
    lr 3e-4, the original train_policy's values (short CPU runs need the larger step)."""

    algo: str = "reinforce"         # reinforce | ppo | grpo
    horizon: int = 15               # imagined steps per rollout
    gamma: float = 0.99             # discount (DreamerV3: 0.997)
    lam: float = 0.95               # lambda of the returns and of GAE
    entropy_scale: float = 3e-4     # entropy bonus, on the normalised advantage scale
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    grad_clip: float = 100.0
    slow_critic_rate: float = 0.02  # EMA update rate of the slow critic
    slow_critic_reg: float = 1.0    # weight of the pull towards the slow critic's predictions
    return_low: float = 5.0         # percentiles of the return range used as the scale
    return_high: float = 95.0
    return_rate: float = 0.01       # EMA rate of the percentile estimates
    ppo_clip: float = 0.2
    ppo_epochs: int = 4
    group: int = 8                  # GRPO: rollouts per start state
    intrinsic_scale: float = 0.0    # weight of the predicted-surprise reward (0: off)
    epsilon: float = 0.0            # PolicyAgent: chance of a uniformly random action when sampling
    reward: str = "world-model"     # what imagined steps earn: the world model's reward head | "novelty" (NoveltyHead)
    novelty_memory: int = 20        # "novelty": a tile counts as seen for this many steps (recent_novelty)
    actor_change: bool = False      # the actor also reads z_t - z_{t-1}: what the last step changed (a press into
                                    # a wall changes nothing), in imagination and in the real game alike

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AgentConfig":
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown AgentConfig field(s) {', '.join(unknown)}")
        cfg = cls(**{k: (float(v) if isinstance(getattr(cls(), k), float) and isinstance(v, int) else v)
                     for k, v in values.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo {self.algo!r} is not one of {', '.join(ALGOS)}")
        if not 1 <= self.horizon <= 50:
            raise ValueError(f"horizon {self.horizon} must be in 1..50")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma {self.gamma} must be in (0, 1] and lambda {self.lam} in [0, 1]")
        if self.group < 2:
            raise ValueError(f"GRPO group {self.group} must be at least 2")
        if self.reward not in REWARDS:
            raise ValueError(f"reward {self.reward!r} is not one of {', '.join(REWARDS)}")
        if self.novelty_memory < 1:
            raise ValueError(f"novelty memory {self.novelty_memory} must be at least 1 step")


# --- advantage estimators ---------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates. rewards, continues (B, H); values (B, H+1) -> (B, H):
    delta_t = r_t + gamma c_t v_{t+1} - v_t;  A_t = delta_t + gamma lam c_t A_{t+1}.
    (A_t + v_t equals imagination.lambda_returns; the tests check both against plain loops.)"""
    deltas = rewards + gamma * continues * values[:, 1:] - values[:, :-1]
    out, last = [], torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        last = deltas[:, t] + gamma * lam * continues[:, t] * last
        out.append(last)
    return torch.stack(out[::-1], 1)


def group_advantages(outcomes: torch.Tensor, group: int, eps: float = 1e-8) -> torch.Tensor:
    """GRPO: outcomes (N * group,) laid out start-major (rows g*group .. g*group+group-1 share a
    start state) -> advantages normalised within each group: zero mean, unit std (0 if all equal)."""
    x = outcomes.reshape(-1, group)  # (N, G)
    centred = x - x.mean(1, keepdim=True)
    std = x.std(1, unbiased=False, keepdim=True)
    return torch.where(std > eps, centred / std.clamp(min=eps), torch.zeros_like(centred)).reshape(-1)


class ReturnNorm(nn.Module):
    """Scale = max(1, EMA(P_high) - EMA(P_low)) of the returns: large returns are scaled down to a
    range of about 1, small ones are left alone (DreamerV3's percentile normalisation)."""

    def __init__(self, low: float = 5.0, high: float = 95.0, rate: float = 0.01):
        super().__init__()
        self.low, self.high, self.rate = low / 100, high / 100, rate
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> torch.Tensor:
        flat = returns.detach().flatten().float()
        lo, hi = torch.quantile(flat, self.low), torch.quantile(flat, self.high)
        if self.count == 0:  # the first batch sets the estimate instead of decaying from zero
            self.lo.copy_(lo), self.hi.copy_(hi)
        else:
            self.lo.lerp_(lo, self.rate), self.hi.lerp_(hi, self.rate)
        self.count += 1
        return self.scale()

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.hi - self.lo, min=1.0)


# --- the agent that acts in the real game -----------------------------------------------------
class PolicyAgent(nn.Module):
    """World model + actor + critic. `act` keeps the belief over the real frames it is shown."""

    def __init__(self, wm_cfg: RSSMConfig, agent_cfg: AgentConfig):
        super().__init__()
        self.wm_cfg, self.cfg = wm_cfg, agent_cfg
        self.wm = WorldModel(wm_cfg)
        self.actor = Actor(wm_cfg, wm_cfg.stoch * wm_cfg.classes if agent_cfg.actor_change else 0)
        self.critic = Critic(wm_cfg)
        self.novelty = NoveltyHead(wm_cfg) if agent_cfg.reward == "novelty" else None
        self.rng = np.random.default_rng()
        self.reset()

    def config_dict(self) -> dict:
        return {"world_model": self.wm_cfg.to_dict(), "agent": self.cfg.to_dict()}

    def reconfigure(self, agent_cfg: AgentConfig) -> None:
        """Continue with new settings (a resumed or --init-policy run): the novelty head is made or dropped
        as `reward` asks; the actor's inputs cannot change under trained weights."""
        if agent_cfg.actor_change != self.cfg.actor_change:
            raise UserError(f"the policy being continued was trained with actor_change={self.cfg.actor_change}; "
                            f"pass --actor-change only if it was (or start a new policy)")
        if (agent_cfg.reward == "novelty") != (self.novelty is not None):
            device = next(self.parameters()).device
            self.novelty = NoveltyHead(self.wm_cfg).to(device) if agent_cfg.reward == "novelty" else None
        self.cfg = agent_cfg

    def reset(self) -> None:
        """Forget the belief: the next frame starts a new episode."""
        self.belief = None        # (h, z): (1, D), (1, S)
        self.last_action = None   # the action taken after the last frame shown

    def record_action(self, action: int) -> None:
        """Say which action was really taken after the last frame (if not the one `act` returned)."""
        self.last_action = int(action)

    def frame_tensor(self, obs: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 at any size -> (1, 1, 3, H', W') floats at the encoder's size."""
        height, width = self.wm_cfg.image_size
        if obs.shape[:2] != (height, width):
            import cv2

            obs = cv2.resize(obs, (width, height), interpolation=cv2.INTER_AREA)
        device = next(self.parameters()).device
        return frames_to_float(torch.from_numpy(np.ascontiguousarray(obs))[None, None], device)

    @torch.inference_mode()
    def observe(self, obs: np.ndarray) -> torch.Tensor:
        """Update the belief with a real frame (and the action taken before it); returns feat (1, F)."""
        embed = self.wm.embed(self.frame_tensor(obs))[:, 0]  # (1, E)
        rssm = self.wm.rssm
        if self.belief is None:
            h, z, _ = rssm.first_step(rssm.post_embed_in(embed), sample=False)
        else:
            action = torch.tensor([self.last_action], device=embed.device)
            h, z, _ = rssm.obs_step(*self.belief, action, embed, sample=False)
        self.belief = (h, z)
        return torch.cat([h, z], -1)

    def imagined_reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Rewards of imagined steps: feat (N, H+1, F) -> (N, H), by the world model's reward head or,
        with reward "novelty", the novelty head on each pair of consecutive states."""
        if self.novelty is not None:
            return self.novelty.predict(feat[:, :-1], feat[:, 1:])
        return self.wm.reward_head.predict(feat[:, 1:])

    @torch.inference_mode()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> int:
        """Observe the real frame `obs` (uint8 (H, W, 3)) and choose the next action."""
        before = None if self.belief is None else self.belief[1]
        feat = self.observe(obs)
        if self.cfg.actor_change:  # the first frame of an episode: nothing changed yet
            feat = imagination.with_change(feat, feat[:, self.wm_cfg.deter:] if before is None else before,
                                           self.wm_cfg.deter)
        if not deterministic and self.cfg.epsilon > 0 and self.rng.random() < self.cfg.epsilon:
            action = int(self.rng.integers(self.wm_cfg.num_actions))
        else:
            dist = self.actor.dist(feat)
            action = int(dist.probs.argmax(-1)) if deterministic else int(dist.sample())
        self.last_action = action
        return action


def build_policy(config: dict) -> PolicyAgent:
    """The "policy" checkpoint kind's builder (checkpoint.py calls it): config = PolicyAgent.config_dict()."""
    return PolicyAgent(RSSMConfig.from_dict(config["world_model"]), AgentConfig.from_dict(config["agent"]))


checkpoint.register_builder("policy", build_policy)


# --- learning in imagination ------------------------------------------------------------------
class Learner(nn.Module):
    """The training side of a PolicyAgent: slow critic, surprise head, return scale, optimisers."""

    def __init__(self, agent: PolicyAgent):
        super().__init__()
        cfg = agent.cfg
        self.agent = [agent]  # a list: not a submodule, so the learner's state holds only its own parts
        self.slow_critic = copy.deepcopy(agent.critic).requires_grad_(False)
        self.surprise = mlp(agent.wm.feat_dim, agent.wm_cfg.head_hidden, 1, 1,
                            norm=agent.wm_cfg.mlp_norm, act=agent.wm_cfg.mlp_act)
        self.return_norm = ReturnNorm(cfg.return_low, cfg.return_high, cfg.return_rate)
        self.actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=cfg.actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam([*agent.critic.parameters(), *self.surprise.parameters()],
                                           lr=cfg.critic_lr, eps=1e-5)
        self.updates = 0

    def full_state(self) -> dict:
        """Everything needed to continue training (plain data for a checkpoint's `extra`)."""
        return {"modules": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "updates": self.updates}

    def load_full_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def start_states(self, batch: dict, device) -> dict:
        """Posterior beliefs of every step of the windows: h (N, D), z (N, S), and the real
        per-step surprise KL(post || prior) (N,) with its features, for the surprise head."""
        wm = self.agent[0].wm
        frames = frames_to_float(batch["obs"], device)  # (B, T, 3, H, W)
        states = imagination.observe(wm, frames, batch["actions"].to(device))
        kl = categorical_kl(states["post_logp"], states["prior_logp"])  # (B, T)
        z = states["z"]
        prev_z = torch.cat([z[:, :1], z[:, :-1]], 1)  # the latent one step before (itself at a window's start)
        return {"h": states["h"].flatten(0, 1).clone(), "z": z.flatten(0, 1).clone(),
                "prev_z": prev_z.flatten(0, 1).clone(), "feat": states["feat"].flatten(0, 1).clone(),
                "kl": kl.flatten().clone()}

    def update(self, start: dict) -> dict:
        """One actor-critic update from the start states of `start_states`. Returns float metrics."""
        agent = self.agent[0]
        cfg, wm, actor, critic = agent.cfg, agent.wm, agent.actor, agent.critic
        wm.requires_grad_(False)
        h, z, prev_z = start["h"], start["z"], start["prev_z"] if cfg.actor_change else None
        if cfg.algo == "grpo":  # each start state `group` times, start-major
            h, z = h.repeat_interleave(cfg.group, 0), z.repeat_interleave(cfg.group, 0)
            prev_z = None if prev_z is None else prev_z.repeat_interleave(cfg.group, 0)
        roll = imagination.imagine_with_policy(wm, actor, (h, z), cfg.horizon, sample=True, prev_z=prev_z)
        feat = roll["feat"].detach()  # (N, H+1, F)
        with torch.no_grad():
            extrinsic = agent.imagined_reward(feat)  # (N, H)
            reward = extrinsic
            intrinsic = self.surprise(feat[:, 1:]).squeeze(-1).clamp(min=0)
            if cfg.intrinsic_scale > 0:
                reward = reward + cfg.intrinsic_scale * intrinsic
            cont = roll["cont"].detach()
            values = critic.value(feat)  # (N, H+1)
            returns = imagination.lambda_returns(reward, values, cont, cfg.gamma, cfg.lam)  # (N, H)
            # weight of step t = chance the episode is still running there (product of continues)
            alive = torch.cat([torch.ones_like(cont[:, :1]), torch.cumprod(cont[:, :-1], 1)], 1)
            scale = self.return_norm.update(returns)
        # -- actor
        if cfg.algo == "reinforce":
            adv = (returns - values[:, :-1]) / scale
            actor_loss = -(alive * (roll["log_probs"] * adv + cfg.entropy_scale * roll["entropy"])).mean()
            self._step(self.actor_opt, actor_loss, actor.parameters())
            ratio_clipped = 0.0
        else:
            with torch.no_grad():
                if cfg.algo == "ppo":
                    adv = gae(reward, values, cont, cfg.gamma, cfg.lam) / scale
                else:
                    outcome = imagination.lambda_returns(reward, values, cont, cfg.gamma, 1.0)[:, 0]  # (N,)
                    adv = group_advantages(outcome, cfg.group)[:, None].expand_as(reward)
            old_logp = roll["log_probs"].detach()
            actions = roll["actions"]
            for _ in range(cfg.ppo_epochs):
                dist = actor.dist(roll["actor_in"])
                logp = dist.log_prob(actions)
                ratio = (logp - old_logp).exp()
                clipped = ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip)
                surrogate = torch.minimum(ratio * adv, clipped * adv)
                actor_loss = -(alive * (surrogate + cfg.entropy_scale * dist.entropy())).mean()
                self._step(self.actor_opt, actor_loss, actor.parameters())
            ratio_clipped = ((ratio - 1).abs() > cfg.ppo_clip).float().mean().item()
        # -- critic (+ surprise head on the real posterior/prior KL)
        slow = self.slow_critic.value(feat[:, :-1])
        critic_loss = (alive * (critic.loss(feat[:, :-1], returns)
                                + cfg.slow_critic_reg * critic.loss(feat[:, :-1], slow))).mean()
        surprise_loss = F.mse_loss(self.surprise(start["feat"]).squeeze(-1), start["kl"])
        self._step(self.critic_opt, critic_loss + surprise_loss,
                   [*critic.parameters(), *self.surprise.parameters()])
        with torch.no_grad():
            for slow_p, p in zip(self.slow_critic.parameters(), critic.parameters()):
                slow_p.lerp_(p, cfg.slow_critic_rate)
        self.updates += 1
        return {
            "loss/actor": actor_loss.item(), "loss/critic": critic_loss.item(), "loss/surprise": surprise_loss.item(),
            "imag/reward": extrinsic.mean().item(), "imag/intrinsic": intrinsic.mean().item(),
            "imag/return": returns.mean().item(), "imag/value": values.mean().item(),
            "imag/cont": cont.mean().item(), "imag/entropy": roll["entropy"].mean().item(),
            "imag/return_scale": float(scale), "imag/adv_std": adv.std().item(), "imag/ratio_clipped": ratio_clipped,
        }

    @staticmethod
    def _step(optimizer, loss, params) -> None:
        params = list(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        optimizer.step()


# --- a reward the world model can predict -----------------------------------------------------


def recent_novelty(ds, memory: int) -> np.ndarray:
    """Per dataset row t: 1.0 if the step t -> t+1 stands the player on a (map, x, y) tile that is not
    among the tiles of rows t-memory+1 .. t of its sequence (outside battle), else 0.0; 0.0 for a
    sequence's last row (no next row). The env's new-tile reward counts against the whole episode,
    which no model state remembers, and its new-map reward pays for every crossing of a map's edge
    in imagination (a policy learns to walk back and forth over it); this one needs only the last
    `memory` steps, which the belief can hold, and pays for walking on rather than turning or pacing."""
    if memory < 1:
        raise UserError(f"novelty memory must be at least 1 step, got {memory}")
    a, segments = ds.arrays, ds.segment_ids
    tiles = (a["map_ids"].astype(np.int64) << 16) | (a["xs"].astype(np.int64) << 8) | a["ys"].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])  # first row of every sequence
    first_row = starts[np.cumsum(np.r_[False, segments[1:] != segments[:-1]])]  # ... of each row's sequence
    out = np.zeros(len(tiles), np.float32)
    for t in range(len(tiles) - 1):
        if segments[t + 1] == segments[t] and not a["in_battles"][t + 1]:
            out[t] = float(tiles[t + 1] not in tiles[max(first_row[t], t - memory + 1):t + 1])
    return out


class NoveltyHead(nn.Module):
    """P(the step from state t to state t+1 stands on a recently unseen tile) from [feat_{t+1}, z_{t+1} - z_t]:
    the change of the latent between the two states says whether the screen moved (a press into a wall
    leaves it the same), h_{t+1} what the last steps showed. Trained on replayed windows (fit_novelty_head)."""

    def __init__(self, wm_cfg: RSSMConfig):
        super().__init__()
        self.deter = wm_cfg.deter
        self.net = mlp(wm_cfg.deter + 2 * wm_cfg.stoch * wm_cfg.classes, wm_cfg.head_hidden, 2, 1,
                       norm=wm_cfg.mlp_norm, act=wm_cfg.mlp_act)

    def forward(self, prev_feat, next_feat):
        """(..., F), (..., F) -> logits (...)."""
        return self.net(imagination.with_change(next_feat, prev_feat[..., self.deter:], self.deter)).squeeze(-1)

    def predict(self, prev_feat, next_feat):
        return torch.sigmoid(self(prev_feat, next_feat))

    def loss(self, prev_feat, next_feat, target):
        return F.binary_cross_entropy_with_logits(self(prev_feat, next_feat), target, reduction="none")


def fit_novelty_head(head: NoveltyHead, wm: WorldModel, ds, memory: int, *, steps: int, batch_size: int, seed: int,
                     device, lr: float = 1e-3) -> dict:
    """Train `head` on recent_novelty(ds, memory) from the frozen world model's posterior features of
    replayed windows (10% of the episodes held out, drawn with `seed`, when there are two or more).
    Returns held-out metrics: binary cross-entropy of the head and of always predicting the training
    mean, and accuracy at 0.5 against the majority's."""
    from tqdm import tqdm

    targets = recent_novelty(ds, memory)
    several = len(np.unique(ds.segment_ids[ds.window_starts])) >= 2
    train_starts, val_starts = ds.split(0.1 if several else 0.0, seed=seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    index = np.arange(ds.seq_len)

    def batch_of(starts):
        batch = ds.get_batch(starts, keys=("obs", "actions"))
        feat = imagination.observe(wm, frames_to_float(batch["obs"], device), batch["actions"].to(device))["feat"]
        rows = np.asarray(starts)[:, None] + index[:-1]
        return feat[:, :-1].clone(), feat[:, 1:].clone(), torch.from_numpy(targets[rows]).to(device)

    wm.eval()
    head.train()
    for _ in tqdm(range(steps), desc="fit novelty reward", unit="step", dynamic_ncols=True):
        prev, nxt, target = batch_of(rng.choice(train_starts, batch_size, replace=len(train_starts) < batch_size))
        loss = head.loss(prev, nxt, target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    held = val_starts if len(val_starts) else train_starts
    chosen = rng.choice(held, min(len(held), 8 * batch_size), replace=False)
    logits, truths = [], []
    with torch.no_grad():
        for i in range(0, len(chosen), batch_size):
            prev, nxt, target = batch_of(chosen[i:i + batch_size])
            logits.append(head(prev, nxt).flatten()), truths.append(target.flatten())
    logit, truth = torch.cat(logits), torch.cat(truths)
    mean = float(np.clip(targets[(np.asarray(train_starts)[:, None] + index[:-1]).ravel()].mean(), 1e-6, 1 - 1e-6))
    constant = torch.full_like(truth, math.log(mean / (1 - mean)))
    return {"novelty_fit/bce": float(F.binary_cross_entropy_with_logits(logit, truth)),
            "novelty_fit/bce_of_mean": float(F.binary_cross_entropy_with_logits(constant, truth)),
            "novelty_fit/accuracy": float(((logit > 0) == (truth > 0.5)).float().mean()),
            "novelty_fit/majority_accuracy": float(max(truth.mean(), 1 - truth.mean())),
            "novelty_fit/target_mean": mean, "novelty_fit/held_out_rows": int(truth.numel())}


def train_in_imagination(agent: PolicyAgent, learner: Learner, ds, starts: np.ndarray, *, updates: int,
                         batch_size: int, seed: int, device, log=None, log_every: int = 10, desc: str = "imagine",
                         on_update=None) -> list:
    """`updates` actor-critic updates on start states from the dataset windows `starts`, drawn in
    seeded shuffled order. Calls log.record(...) every `log_every` updates; returns the records."""
    from tqdm import tqdm

    rng = np.random.default_rng([seed, learner.updates])
    order, cursor, records = rng.permutation(starts), 0, []
    agent.wm.eval()
    bar = tqdm(range(updates), desc=desc, unit="update", dynamic_ncols=True)
    t_start = time.perf_counter()
    for i in bar:
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(starts), 0
        batch = ds.get_batch(order[cursor:cursor + batch_size])
        cursor += batch_size
        metrics = learner.update(learner.start_states(batch, device))
        rate = (i + 1) / (time.perf_counter() - t_start)
        bar.set_postfix(ret=f"{metrics['imag/return']:.3g}", ent=f"{metrics['imag/entropy']:.2f}", ups=f"{rate:.2f}")
        if log is not None and (learner.updates % log_every == 0 or i == updates - 1):
            record = {"update": learner.updates, "algo": agent.cfg.algo, **metrics, "perf/updates_per_s": rate}
            log.record(record, epoch_end=False)
            records.append(record)
        if on_update is not None:
            on_update(learner.updates)
    bar.close()
    return records


def save_policy(path, agent: PolicyAgent, learner: Learner | None = None, extra: dict | None = None) -> Path:
    """Atomic "policy" checkpoint: world model + actor + critic weights and configs (+ learner state)."""
    extra = dict(extra or {})
    if learner is not None:
        extra["learner"] = learner.full_state()
    return checkpoint.save_checkpoint(path, kind="policy", config=agent.config_dict(), model_state=agent.state_dict(),
                                      step=learner.updates if learner else 0, extra=extra)


def load_policy(path, device="cpu") -> tuple[PolicyAgent, dict]:
    """(agent in eval mode, the checkpoint dict) from a "policy" checkpoint."""
    ckpt = checkpoint.load_checkpoint(path, kind="policy")
    return checkpoint.build_model(ckpt, device=device), ckpt


def load_world_model(path, device="cpu") -> WorldModel:
    """The world model of an "rssm" checkpoint (or of a "policy" one)."""
    ckpt = checkpoint.load_checkpoint(path)
    if ckpt["kind"] == "policy":
        return checkpoint.build_model(ckpt, device=device).wm
    if ckpt["kind"] != "rssm":
        raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint; pass a world-model ('rssm') checkpoint "
                        f"written by scripts/train_rssm.py")
    return checkpoint.build_model(ckpt, device=device)


# --- evaluation in the real emulator ----------------------------------------------------------
EVAL_SEED_FRAMES = 1000  # evaluation start states wait 1000 + 7 i title frames: never a training state


_EVAL_STATES: dict = {}  # (rom path, count, offset) -> list of save-state bytes, made once per process


def eval_start_states(rom, count: int, offset: int = EVAL_SEED_FRAMES) -> list:
    """Start states not used in training: collection makes its own with title waits 17 i (i < 4 by
    default); these wait `offset` + 7 i frames. For Red/Blue (one scripted intro) they are the intro's."""
    from env import make_start_states, open_emulator
    from save_states import cartridge_start, load_state_bytes, save_state_bytes

    key = (str(Path(rom).resolve()), count, offset)
    if key in _EVAL_STATES:
        return _EVAL_STATES[key]
    pyboy, info = open_emulator(rom)
    try:
        if info.game != "cartridge":
            states = make_start_states(pyboy, info.game, count)
        else:
            power_on = save_state_bytes(pyboy)
            states = []
            for i in range(count):
                load_state_bytes(pyboy, power_on)
                cartridge_start(pyboy, seed_frames=offset + 7 * i)
                states.append(save_state_bytes(pyboy))
    finally:
        pyboy.stop(save=False)
    _EVAL_STATES[key] = states
    return states


def run_episode(env, policy: str, *, agent: PolicyAgent | None = None, state_index: int, steps: int, rng,
                deterministic: bool = False, record: bool = False) -> dict:
    """One episode of `policy` ("agent" | "random" | "explore") from start state `state_index`.
    Returns unique tiles, maps, battles won, badges, return (and frames if `record`)."""
    from explorer import ExplorePolicy

    obs, info = env.reset(options={"state_index": state_index})
    start = info["state"]
    explorer = ExplorePolicy(rng) if policy == "explore" else None
    if agent is not None:
        agent.reset()
    total, frames, badges = 0.0, [], 0
    for _ in range(steps):
        if record:
            frames.append(env.render())
        if policy == "agent":
            action = agent.act(obs, deterministic=deterministic)
        elif policy == "explore":
            action = explorer.act(obs, info["state"])
        else:
            action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        badges = bin(info["state"].badges).count("1")
        if terminated:
            break
    if record:
        frames.append(env.render())
    out = {"unique_tiles": info["tiles_seen"], "maps": info["maps_seen"], "battles_won": info["battles_won"],
           "badges": badges, "return": total, "steps": info["episode_step"],
           "start_tile": [int(start.map_id), int(start.x), int(start.y)]}
    if record:
        out["frames"] = frames
    return out


def evaluate(agent: PolicyAgent | None, *, rom, policies=("agent", "random", "explore"), episodes: int = 5,
             steps: int = 500, start_state_count: int = 5, seed: int = 0, deterministic: bool = False,
             video_path=None, state_offset: int = EVAL_SEED_FRAMES, start_walk: int = 0) -> dict:
    """Zero-shot evaluation in the emulator at the encoder's resolution, several start states not
    used in training, side by side with the random policy and the scripted explorer. With start_walk
    N > 0 each start state is where the scripted explorer (seeded [seed, i]) stands after N actions
    from the i-th of them (explorer.walk_start_states): episodes that begin on different tiles and maps.
    Returns {policy: {"episodes": [...], "mean": {...}}}; writes an mp4 of the agent's first episode."""
    from env import PokemonEnv

    resolution = tuple(agent.wm_cfg.image_size) if agent is not None else (144, 160)
    states = eval_start_states(rom, start_state_count, state_offset)
    env = PokemonEnv(rom=rom, save_states=states, resolution=resolution, episode_length=steps)
    results = {}
    try:
        if start_walk > 0:
            from explorer import walk_start_states

            env.start_states = walk_start_states(env, start_state_count, start_walk, seed)
        for policy in policies:
            if policy == "agent" and agent is None:
                continue
            rng = np.random.default_rng([seed, ALL_POLICIES.index(policy)])
            if agent is not None:
                agent.rng = np.random.default_rng([seed, 99])
            runs = []
            for episode in range(episodes):
                record = policy == "agent" and episode == 0 and video_path is not None
                out = run_episode(env, policy, agent=agent, state_index=episode % len(states), steps=steps, rng=rng,
                                  deterministic=deterministic, record=record)
                if record:
                    frames = out.pop("frames")
                    artifacts.write_video([np.repeat(np.repeat(f, 2, 0), 2, 1) for f in frames], video_path, fps=10)
                runs.append(out)
            keys = [k for k in runs[0] if k not in ("steps", "start_tile")]
            results[policy] = {"episodes": runs, "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys}}
    finally:
        env.close()
    return results


ALL_POLICIES = ("agent", "random", "explore")


def eval_table(results: dict, title: str = "") -> str:
    """Markdown table of evaluate()'s means (one row per policy)."""
    keys = ("unique_tiles", "maps", "battles_won", "badges", "return")
    lines = [f"### {title}", ""] if title else []
    lines += ["| policy | episodes | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for policy, res in results.items():
        mean = res["mean"]
        lines.append(f"| {policy} | {len(res['episodes'])} | " + " | ".join(f"{mean[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def flat_eval_metrics(results: dict) -> dict:
    """{"eval/<policy>/<metric>": mean} for metrics.jsonl."""
    return {f"eval/{policy}/{k}": v for policy, res in results.items() for k, v in res["mean"].items()}


def plot_progress(records: list, path, x_key: str = "env_steps") -> None:
    """Return and unique tiles of the evaluated policy against environment steps (one png); records
    evaluated from other start states ("eval/start_walk") get lines of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in records if "eval/agent/unique_tiles" in r]
    if not points:
        return
    groups = {}
    for r in points:
        groups.setdefault(r.get("eval/start_walk", 0), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("unique_tiles", "return")):
        for walk, group in groups.items():
            where = f" (starts walked {walk})" if walk else " (cartridge start)"
            where = where if len(groups) > 1 else ""
            xs = [r[x_key] for r in group]
            ax.plot(xs, [r[f"eval/agent/{key}"] for r in group], marker="o", label="policy" + where)
            for base in ("random", "explore"):
                if any(f"eval/{base}/{key}" in r for r in group):
                    ax.plot(xs, [r.get(f"eval/{base}/{key}", math.nan) for r in group], linestyle="--",
                            label=base + where)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    fig.suptitle("Dreamer loop: evaluation (mean over episodes)")
    artifacts.save_figure(fig, Path(path))
