"""Planning in the v1 world model: candidate action sequences, imagined rollouts, goal scores, MPC and CEM.

A plan is scored by imagining it: encode the current frame with the VAE, roll the latent GRU out
open-loop with the plan's actions, read the final latent with the RAM probe, and score
-Manhattan distance to the goal tile, +1000 / -1000 for being on / off the goal map, -50 if the
probe predicts a battle and -10 if it predicts an open dialog (the original's score). The CEM
planner (ours) scores the whole imagined path instead: the best step's score less a small cost per
step, so a plan that reaches the goal early is not marked down for walking on past it (the episode
ends on the goal tile). It can also imagine from the GRU state carried along the episode (belief)
and snap every imagined latent to the nearest real frame's (`latents.LatentMemory`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dataset import frames_to_float
from models import VAE, LatentDynamics, RamProbe

DOWN, LEFT, RIGHT, UP, A, B, START, PASS = range(8)  # env.ACTIONS order
MOVES = (DOWN, LEFT, RIGHT, UP)
STEP = {DOWN: (0, 1), LEFT: (-1, 0), RIGHT: (1, 0), UP: (0, -1)}  # tile (dx, dy) of each move


@dataclass(frozen=True)
class Goal:
    map_id: int
    x: int
    y: int


@dataclass
class Plan:
    actions: np.ndarray  # (L,) int64, the chosen sequence
    candidates: np.ndarray  # (N, L) every sequence scored in the last round
    scores: np.ndarray  # (N,) their scores
    best: int  # index of `actions` in `candidates`
    path_xy: np.ndarray  # (L, 2) probe (x, y) along the chosen sequence's imagined rollout
    final_frame: np.ndarray  # (H, W, 3) uint8, the decoded final imagined latent


def candidate_macros(length: int = 15, num_random: int = 5, rng: np.random.Generator | None = None) -> np.ndarray:
    """The original's macro-sequences (N, length): 4 straight lines, 4 zig-zags, A*, B*, A-then-down, randoms."""
    rng = rng or np.random.default_rng(0)
    t = np.arange(length)
    rows = [np.full(length, move) for move in MOVES]
    for first, second in ((DOWN, RIGHT), (DOWN, LEFT), (UP, RIGHT), (UP, LEFT)):
        rows.append(np.where(t % 2 == 0, first, second))
    rows.append(np.full(length, A))
    rows.append(np.full(length, B))
    rows.append(np.where(t < length // 3, A, DOWN))  # talk / confirm, then walk down
    rows += [rng.integers(0, 8, length) for _ in range(num_random)]
    return np.stack(rows).astype(np.int64)


class LatentPlanner:
    """Holds the three frozen v1 networks; imagines batches of action sequences from a frame."""

    def __init__(self, vae: VAE, dynamics: LatentDynamics, probe: RamProbe | None, device: str = "cpu", memory=None):
        """probe may be None when only imagining and decoding (no scoring). memory (a
        `latents.LatentMemory`): every imagined latent is snapped to its nearest real frame's latent."""
        self.vae, self.dynamics, self.probe = vae.eval(), dynamics.eval(), probe.eval() if probe is not None else None
        self.device, self.memory = device, memory

    @torch.no_grad()
    def encode(self, frame: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, D) latent mean."""
        x = frames_to_float(torch.from_numpy(np.ascontiguousarray(frame))[None, None], self.device)  # (1, 1, 3, H, W)
        return self.vae.encode(x[:, 0])[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (N, D) -> frames (N, H, W, 3) uint8."""
        frames = self.vae.decode(latents)  # (N, 3, H, W)
        return (frames.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def imagine(self, z0: torch.Tensor, sequences: np.ndarray, h0: torch.Tensor | None = None):
        """z0 (1, D), sequences (N, L) -> latents (N, L, D) and the probe's reading of every step.
        h0 (1, H): the GRU state filtered over the episode's real frames so far (None: from z0 alone)."""
        actions = torch.as_tensor(sequences, device=self.device)
        n, steps = actions.shape
        latents, _ = self.dynamics.rollout(z0.expand(n, -1), actions, None if h0 is None else h0.expand(n, -1),
                                           project=self.memory.snap if self.memory is not None else None)  # (N, L, D)
        dim = latents.shape[-1]
        out = self.probe(latents.reshape(n * steps, dim))
        return latents, {k: v.reshape(n, steps, *v.shape[1:]) for k, v in out.items()}

    @staticmethod
    def score(final: dict, goal: Goal) -> torch.Tensor:
        """The original's score of each sequence from the probe's reading of its final latent (N,)."""
        dist = (final["xy"][:, 0] - goal.x).abs() + (final["xy"][:, 1] - goal.y).abs()
        on_map = final["map_logits"].argmax(-1) == goal.map_id
        return (
            -dist
            + torch.where(on_map, 1000.0, -1000.0)
            - 50.0 * (final["battle_logit"] > 0).float()
            - 10.0 * (final["dialog_logit"] > 0).float()
        )

    @classmethod
    def score_path(cls, out: dict, goal: Goal, step_cost: float = 0.25) -> torch.Tensor:
        """Every step's score (N, L) less step_cost per step taken; a sequence scores its best step (N,)."""
        n, steps = out["xy"].shape[:2]
        per_step = cls.score({k: v.reshape(n * steps, *v.shape[2:]) for k, v in out.items()}, goal).view(n, steps)
        return (per_step - step_cost * torch.arange(1, steps + 1, device=per_step.device)).max(1).values

    def evaluate(self, z0: torch.Tensor, sequences: np.ndarray, goal: Goal, path: bool = False, h0=None):
        """Imagine and score `sequences` (N, L): by the final latent (the original) or, with path, by the best step."""
        latents, out = self.imagine(z0, sequences, h0)
        scores = self.score_path(out, goal) if path else self.score({k: v[:, -1] for k, v in out.items()}, goal)
        return latents, out, scores

    def _plan(self, candidates, latents, out, scores) -> Plan:
        """The best-scored of evaluated `candidates` as a Plan."""
        best = int(scores.argmax())
        return Plan(
            actions=candidates[best].copy(),
            candidates=candidates,
            scores=scores.cpu().numpy(),
            best=best,
            path_xy=out["xy"][best].cpu().numpy(),
            final_frame=self.decode(latents[best, -1:])[0],
        )

    def plan_mpc(self, frame: np.ndarray, goal: Goal, length: int = 15, rng: np.random.Generator | None = None,
                 h0: torch.Tensor | None = None, z0: torch.Tensor | None = None) -> Plan:
        """Score the fixed macro candidates and return the best (z0: the frame's latent, if already encoded)."""
        candidates = candidate_macros(length, rng=rng)
        z0 = self.encode(frame) if z0 is None else z0
        return self._plan(candidates, *self.evaluate(z0, candidates, goal, h0=h0))

    def plan_cem(
        self,
        frame: np.ndarray,
        goal: Goal,
        length: int = 15,
        population: int = 128,
        elites: int = 12,
        iterations: int = 4,
        smoothing: float = 0.3,
        rng: np.random.Generator | None = None,
        banned_first: frozenset = frozenset(),
        h0: torch.Tensor | None = None,
        z0: torch.Tensor | None = None,
    ) -> Plan:
        """Cross-entropy method over per-step action distributions, seeded with the macros.

        Each round samples `population` sequences from independent per-step categoricals, keeps
        the `elites` best and moves the categoricals toward their action frequencies. The best
        sequence so far is carried into every round, so the result scores at least as well as the
        best macro-sequence (the rollout is deterministic). Sequences are scored by their path
        (`score_path`). Sequences starting with an action in `banned_first` are never chosen
        (the policy bans a first action that changed nothing in the real game twice in a row).
        h0 is the belief state (`PlannerPolicy` with belief) the rollouts start from; z0 the frame's
        latent when the caller has encoded it already.
        """
        rng = rng or np.random.default_rng(0)
        z0 = self.encode(frame) if z0 is None else z0
        probs = np.full((length, 8), 1.0 / 8)  # (L, 8)
        carry = candidate_macros(length, rng=rng)
        for _ in range(iterations):
            cum = probs.cumsum(-1)  # (L, 8)
            draws = (rng.random((population, length, 1)) > cum[None]).sum(-1).clip(0, 7)  # (P, L)
            candidates = np.concatenate([carry, draws]).astype(np.int64)
            latents, out, scores = self.evaluate(z0, candidates, goal, path=True, h0=h0)
            scores = self._ban(scores, candidates, banned_first)
            order = scores.argsort(descending=True).cpu().numpy()
            elite = candidates[order[:elites]]  # (E, L)
            freq = np.stack([(elite == a).mean(0) for a in range(8)], -1)  # (L, 8)
            probs = smoothing * probs + (1 - smoothing) * freq
            probs = (probs + 1e-3) / (probs + 1e-3).sum(-1, keepdims=True)  # keep every action possible
            carry = elite[:1]
        return self._plan(candidates, latents, out, scores)  # the last round's candidates, as scored there

    @staticmethod
    def _ban(scores: torch.Tensor, candidates: np.ndarray, banned_first) -> torch.Tensor:
        if not banned_first:
            return scores
        banned = torch.from_numpy(np.isin(candidates[:, 0], list(banned_first))).to(scores.device)
        return scores.masked_fill(banned, -1e9)


def greedy_action(x: int, y: int, goal: Goal, blocked: set, rng: np.random.Generator) -> int:
    """No world model: step along the axis with the larger gap to the goal, avoiding moves just blocked."""
    dx, dy = goal.x - x, goal.y - y
    wanted = []
    if dx:
        wanted.append((abs(dx), RIGHT if dx > 0 else LEFT))
    if dy:
        wanted.append((abs(dy), DOWN if dy > 0 else UP))
    for _, move in sorted(wanted, reverse=True):
        if move not in blocked:
            return move
    free = [m for m in MOVES if m not in blocked] or list(MOVES)
    return int(rng.choice(free))


# --- policies for goal episodes in the emulator --------------------------------------------------
class StuckPresses:
    """Presses that made no progress twice in a row since the last one that did (a wall, or a
    press in a new direction, which only turns the player): the greedy walker judges progress by
    its RAM position, the CEM planner by the frame."""

    def __init__(self, after: int = 2):
        self.after = after
        self.clear()

    def clear(self) -> None:
        self.fails, self.banned = {}, set()

    def record(self, action: int, progressed: bool) -> bool:
        """Note the outcome of `action`; True when it has just been banned."""
        if progressed:
            self.clear()
            return False
        self.fails[action] = self.fails.get(action, 0) + 1
        if self.fails[action] >= self.after and action not in self.banned:
            self.banned.add(action)
            return True
        return False


class PlannerPolicy:
    """World-model planner (MPC or CEM): plan from the current frame, run the first
    `execute_steps` actions of the plan, then replan.

    CEM (ours) also watches the real frames: a first action after which the frame stayed the same
    (under `still` of its pixels changed: a wall, or a press that only turned the player) twice in
    a row is banned until the frame changes, so a model that imagines walking through a wall does
    not replan the same blocked step forever. No RAM is read. MPC stays the original's.

    With `belief` the GRU state is carried along the episode (`LatentDynamics.observe` on every real
    frame and action taken) and every plan imagines from it, so the model knows what the frame
    alone does not show, such as which way the player faces (a press in a new direction only
    turns); without it every plan starts from the current frame alone (the original).
    """

    def __init__(self, planner: LatentPlanner, method: str = "mpc", horizon: int = 15, execute_steps: int = 5, seed: int = 0,
                 plan_kwargs: dict | None = None, still: float = 0.03, belief: bool = False):
        self.planner, self.method, self.horizon, self.execute_steps = planner, method, horizon, execute_steps
        self.plan_kwargs = plan_kwargs or {}  # e.g. population / iterations for CEM
        self.still, self.belief = still, belief
        self.rng = np.random.default_rng(seed)
        self.reset(None)

    def reset(self, goal: Goal | None) -> None:
        self.goal, self.queue, self.last_plan = goal, [], None
        self.last_obs, self.last_action, self.stuck = None, None, StuckPresses()
        self.last_z, self.h = None, None

    @torch.no_grad()
    def _update_belief(self, obs: np.ndarray) -> None:
        """h after the last action, from the frame it was taken on; then remember this frame's latent."""
        z = self.planner.encode(obs)
        if self.last_z is not None:
            action = torch.tensor([self.last_action], device=self.planner.device)
            self.h = self.planner.dynamics.observe(self.last_z, action, self.h)
        self.last_z = z

    def act(self, obs: np.ndarray, state) -> int:
        kwargs = dict(self.plan_kwargs)
        if self.belief:
            self._update_belief(obs)
            kwargs["z0"] = self.last_z  # this frame, encoded once for the belief and the plan
            if self.h is not None:
                kwargs["h0"] = self.h
        if self.method == "cem":
            if self.last_obs is not None:
                changed = (obs != self.last_obs).any(-1).mean()  # fraction of pixels that changed
                if self.stuck.record(self.last_action, progressed=changed >= self.still):
                    self.queue = []  # replan now, without it
            kwargs["banned_first"] = frozenset(self.stuck.banned)
        if not self.queue:
            plan_fn = self.planner.plan_cem if self.method == "cem" else self.planner.plan_mpc
            self.last_plan = plan_fn(obs, self.goal, length=self.horizon, rng=self.rng, **kwargs)
            self.queue = list(self.last_plan.actions[: self.execute_steps])
        self.last_obs, self.last_action = obs.copy(), int(self.queue.pop(0))
        return self.last_action


class GreedyPolicy:
    """No world model: walk toward the goal from the true (RAM) position, sidestepping walls."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, goal: Goal) -> None:
        self.goal, self.last, self.stuck = goal, None, StuckPresses()

    def act(self, obs: np.ndarray, state) -> int:
        position = (state.map_id, state.x, state.y)
        if self.last is not None:
            self.stuck.record(self.last[1], progressed=self.last[0] != position)
        action = greedy_action(state.x, state.y, self.goal, self.stuck.banned, self.rng)
        self.last = (position, action)
        return action


class RandomPolicy:
    """Uniformly random actions over all 8 buttons."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, goal: Goal) -> None:
        pass

    def act(self, obs: np.ndarray, state) -> int:
        return int(self.rng.integers(0, 8))


def at_goal(state, goal: Goal) -> bool:
    return state.map_id == goal.map_id and state.x == goal.x and state.y == goal.y


def sample_goal(env, state_index: int, rng: np.random.Generator, radius: int = 10, min_distance: int = 2,
                walk_steps: int = 200) -> Goal | None:
    """A tile on the start map that a random walk from start state `state_index` stood on, at
    Manhattan distance min_distance..radius from the start: reachable by construction. The walk
    restarts from the start state whenever it leaves the map or meets a battle. None if no such tile."""
    _, info = env.reset(options={"state_index": state_index})
    start = info["state"]
    tiles = set()
    for _ in range(walk_steps):
        action = int(rng.choice(MOVES)) if rng.random() < 0.9 else A  # A clears text boxes
        _, _, terminated, _, info = env.step(action)
        s = info["state"]
        if s.map_id != start.map_id or s.in_battle or terminated:
            env.reset(options={"state_index": state_index})
            continue
        if not s.dialog_open and min_distance <= abs(s.x - start.x) + abs(s.y - start.y) <= radius:
            tiles.add((s.x, s.y))
    if not tiles:
        return None
    x, y = sorted(tiles)[int(rng.integers(len(tiles)))]
    return Goal(start.map_id, x, y)


def run_goal_episode(env, state_index: int, goal: Goal, policy, max_steps: int = 60, on_step=None) -> dict:
    """Reset to start state `state_index` and act until the player stands on the goal tile or
    `max_steps` actions have been taken. on_step(obs, state, action, policy) is called before each
    action, and once more with action None after the last. Returns success, steps (actions taken until the goal, or None) and the start tile."""
    obs, info = env.reset(options={"state_index": state_index})
    policy.reset(goal)
    state = info["state"]
    start, steps = (state.x, state.y), 0
    while not at_goal(state, goal) and steps < max_steps:
        action = policy.act(obs, state)
        if on_step is not None:
            on_step(obs, state, action, policy)
        obs, _, terminated, _, info = env.step(action)
        state, steps = info["state"], steps + 1
        if terminated:
            break
    success = at_goal(state, goal)
    if on_step is not None:
        on_step(obs, state, None, policy)  # the final frame: no action
    return {"success": success, "steps": steps if success else None, "start": start, "end": (state.map_id, state.x, state.y)}
