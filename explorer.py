"""A novelty-seeking scripted walker: the data collector's stand-in for the original's PPO policy.

It learns the walkable graph of (map, x, y) tiles from the RAM position as it goes
(which move from which tile leads where, which moves bump into something), walks by
breadth-first search to the nearest tile with a move not yet tried, and, when everything
reachable is known, to rarely visited tiles. It talks to what it bumps into (A), clears
text boxes (A, sometimes B), fights battles by pressing A, and now and then opens the
start menu (START, then B). The knowledge persists across episodes, so later episodes
walk straight to the frontier.
"""
from collections import Counter, deque

import numpy as np

from env import ACTIONS
from save_states import save_state_bytes

DOWN, LEFT, RIGHT, UP, A, B, START, PASS = range(len(ACTIONS))
MOVES = (DOWN, LEFT, RIGHT, UP)
FACING_MOVE = {0: DOWN, 4: UP, 8: LEFT, 12: RIGHT}  # wSpritePlayerStateData1FacingDirection -> move
MODES = ("deterministic", "stochastic", "random")


class ExplorePolicy:
    """act(obs, state) -> action index (obs is unused: the walker reads the RAM position);
    call start_episode(mode) at each reset."""

    def __init__(self, rng, noise=0.1, start_prob=0.01, blocked_after=2, detour_steps=40):
        self.rng = rng
        self.noise = noise                  # random-action probability in "stochastic" mode
        self.start_prob = start_prob        # chance per free step of opening the start menu
        self.blocked_after = blocked_after  # failed tries before a move counts as a wall
        self.detour_steps = detour_steps    # how long a known edge stays avoided once blocked (an NPC)
        self.steps = 0
        self.edges = {}                     # (tile, move) -> tile reached; kept once learned
        self.blocked_until = {}             # (tile, move) of a known edge -> step it may be tried again
        self.failures = Counter()           # (tile, move) -> tries that did not move
        self.visits = Counter()             # tile -> steps spent there, all episodes
        self.talked = set()                 # (tile, move) where A was pressed after a bump
        self.start_episode("stochastic")

    def start_episode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.plan = deque()   # (move, tile expected after it)
        self.previous = None  # (tile, action) of the last free step
        self.pending = None   # action forced for the next step (B after START)
        self.expected = None  # tile the plan's last move should have reached

    def _free_moves(self, tile):
        return [m for m in MOVES if (tile, m) not in self.edges and self.failures[(tile, m)] < self.blocked_after]

    def _learn(self, tile):
        """Record where the previous move led; returns that move if it bumped into something."""
        if self.previous is None:
            return None
        before, action = self.previous
        self.previous = None
        if action not in MOVES:
            return None
        if tile == before:
            self.failures[(before, action)] += 1
            if self.failures[(before, action)] < self.blocked_after:
                return None  # the first press may only have turned the player
            if (before, action) in self.edges:  # a known way is blocked: someone stands there
                self.blocked_until[(before, action)] = self.steps + self.detour_steps
                self.failures.pop((before, action))
            return action
        same_map = tile[0] == before[0]
        if not same_map or abs(tile[1] - before[1]) + abs(tile[2] - before[2]) == 1:
            self.edges[(before, action)] = tile
            self.failures.pop((before, action), None)
        return None

    def _search(self, start):
        """Breadth-first over known edges to the nearest tile with an untried move (or, when
        none is left, to a rarely visited tile); returns the plan as (move, tile) pairs."""
        parents = {start: None}
        queue = deque([start])
        rare_target, rare_visits = None, None
        while queue:
            tile = queue.popleft()
            if tile != start and self._free_moves(tile):
                return self._path(parents, tile)
            visits = self.visits[tile] + self.rng.random()  # random tie-break
            if tile != start and (rare_visits is None or visits < rare_visits):
                rare_target, rare_visits = tile, visits
            for move in MOVES:
                nxt = self.edges.get((tile, move))
                if nxt is not None and nxt not in parents and self.blocked_until.get((tile, move), 0) <= self.steps:
                    parents[nxt] = (tile, move)
                    queue.append(nxt)
        return self._path(parents, rare_target) if rare_target is not None else deque()

    @staticmethod
    def _path(parents, target):
        plan = deque()
        while parents[target] is not None:
            tile, move = parents[target]
            plan.appendleft((move, target))
            target = tile
        return plan

    def act(self, obs, state) -> int:
        tile = (state.map_id, state.x, state.y)
        if self.pending is not None:
            action, self.pending = self.pending, None
            return action
        if self.mode == "random":
            return int(self.rng.integers(len(ACTIONS)))
        if state.in_battle:
            self.previous, self.plan = None, deque()
            return A if self.rng.random() < 0.85 else int(self.rng.choice(MOVES))
        if state.dialog_open:
            self.previous, self.plan = None, deque()
            return A if self.rng.random() < 0.8 else B
        self.steps += 1
        bumped = self._learn(tile)
        self.visits[tile] += 1
        action = self._choose(tile, bumped, FACING_MOVE.get(state.facing))
        self.previous = (tile, action)
        return action

    def _choose(self, tile, bumped, facing) -> int:
        if self.mode == "stochastic" and self.rng.random() < self.noise:
            self.plan = deque()
            return int(self.rng.integers(len(ACTIONS)))
        if bumped is not None and (tile, bumped) not in self.talked:
            self.talked.add((tile, bumped))  # something is in the way: a sign, a person?
            return A
        if self.rng.random() < self.start_prob:
            self.pending = B
            return START
        free = self._free_moves(tile)
        if free:  # try the way the player faces first: a new direction costs a step to turn
            self.plan = deque()
            return facing if facing in free else int(self.rng.choice(free))
        if not (self.plan and self.expected == tile):
            self.plan = self._search(tile)
        if not self.plan:
            return int(self.rng.choice(MOVES))
        move, self.expected = self.plan.popleft()
        return move


def walk_start_states(env, count: int, steps: int, seed: int = 0) -> list:
    """`count` save states reached by the scripted explorer walking `steps` actions (and on, up to
    200 more, until no battle or text box is open) from the env's start states in turn: episodes
    (goals, evaluation, collection) that begin all over the world, not only on the game's first tile."""
    states = []
    for i in range(count):
        policy = ExplorePolicy(np.random.default_rng([seed, i]))
        obs, info = env.reset(options={"state_index": i % len(env.start_states)})
        for t in range(steps + 200):
            state = info["state"]
            if t >= steps and not state.in_battle and not state.dialog_open:
                break
            obs, _, _, _, info = env.step(policy.act(obs, state))
        states.append(save_state_bytes(env.pyboy))
    return states
