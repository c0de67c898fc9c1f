"""The emulator as a Gymnasium env: ROM identification, one step = one button press, reward.

A step presses a button for 8 frames, then runs to `ticks_per_action` frames in all and
renders only the last one. Episodes start from save states held in memory (bytes), so a
reset is a `load_state`, never a new emulator.
"""
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
from pyboy import PyBoy

from errors import UserError
from game_state import GameState, read_state, screen_rgb
import ram_addresses as ram
from save_states import CARTRIDGE_GAME_MODE, cartridge_start, load_state_bytes, pokered_intro, save_state_bytes

REPO = Path(__file__).resolve().parent
DEFAULT_ROM = REPO / "cartridge" / "pokedreamer.gb"

ACTIONS = ("down", "left", "right", "up", "a", "b", "start", "pass")
PRESS_FRAMES = 8
NATIVE_RESOLUTION = (144, 160)

KNOWN_SHA1 = {
    "ea9bcae617fdf159b045185467ae58b2e4a48b9a": "red",
    "d7037c83e1ae5b39bde3c30787637ba1d4c48ce2": "blue",
}
YELLOW_SHA1 = "cc7d03262ebfaf2f06772c1a480c7d9d5f4a38e1"
ACCEPTED = "the open cartridge (cartridge/pokedreamer.gb), Pokémon Red or Blue (USA, Europe)"


@dataclass(frozen=True)
class RomInfo:
    path: Path
    sha1: str
    game: str  # "cartridge", "red" or "blue"


def _header_checksum(rom: bytes) -> int:
    checksum = 0
    for byte in rom[0x134:0x14D]:
        checksum = (checksum - byte - 1) & 0xFF
    return checksum


def _cartridge_sha1() -> str | None:
    """SHA-1 of the committed open cartridge, computed now (None if it is not built)."""
    try:
        return hashlib.sha1(DEFAULT_ROM.read_bytes()).hexdigest()
    except OSError:
        return None


def identify_rom(path) -> RomInfo:
    """Say which game `path` is, or raise UserError saying why it cannot be used."""
    path = Path(path)
    try:
        rom = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"ROM {path} does not exist; pass --rom with {ACCEPTED}") from None
    except OSError as err:
        raise UserError(f"ROM {path} cannot be read ({err.strerror}); pass a readable Game Boy ROM file") from None
    if len(rom) == 0 or len(rom) % 0x4000:
        raise UserError(f"ROM {path} is {len(rom)} bytes, not a multiple of 16 KiB: not a Game Boy ROM, or truncated")
    if rom[0x14D] != _header_checksum(rom):
        raise UserError(f"ROM {path} has a bad header checksum at 0x14D: not a Game Boy ROM, or corrupt")
    sha1 = hashlib.sha1(rom).hexdigest()
    if sha1 == YELLOW_SHA1:
        raise UserError(f"ROM {path} is Pokémon Yellow, whose RAM layout differs; use {ACCEPTED}")
    game = KNOWN_SHA1.get(sha1)
    if game is None and sha1 == _cartridge_sha1():
        game = "cartridge"
    if game is None:
        title = rom[0x134:0x144].split(b"\0")[0].decode("ascii", "replace").strip()
        raise UserError(f"ROM {path} (title '{title}', SHA-1 {sha1}) is not a supported game; use {ACCEPTED}")
    return RomInfo(path=path, sha1=sha1, game=game)


def open_emulator(path) -> tuple:
    """Identify the ROM and start a headless, silent emulator on it: (PyBoy, RomInfo)."""
    info = identify_rom(path)
    pyboy = PyBoy(str(info.path), window="null", sound_emulated=False)
    pyboy.set_emulation_speed(0)  # as fast as possible
    return pyboy, info


def step_emulator(pyboy, action: int, ticks_per_action: int = 24) -> None:
    """Press ACTIONS[action] for 8 frames, release, and run to `ticks_per_action` frames;
    only the last frame is rendered."""
    button = ACTIONS[action]
    idle = ticks_per_action
    if button != "pass":
        press = min(PRESS_FRAMES, ticks_per_action - 1)
        pyboy.button_press(button)
        pyboy.tick(press, False)
        pyboy.button_release(button)
        idle -= press
    if idle > 1:
        pyboy.tick(idle - 1, False)
    pyboy.tick(1, True)


def make_start_states(pyboy, game: str, count: int = 1) -> list:
    """Bring `pyboy` to `count` start states (different title-screen waits, so the game's
    random numbers differ) and return them as save-state bytes."""
    power_on = save_state_bytes(pyboy)  # PyBoy has no reset button: reload this instead
    states = []
    for index in range(count):
        load_state_bytes(pyboy, power_on)
        if game == "cartridge":
            cartridge_start(pyboy, seed_frames=17 * index)
        else:
            pokered_intro(pyboy)
        states.append(save_state_bytes(pyboy))
    return states


def read_state_files(save_states) -> list:
    """Save states given as bytes or paths -> list of bytes (UserError naming a bad file)."""
    states = []
    for item in save_states:
        if isinstance(item, (bytes, bytearray)):
            states.append(bytes(item))
            continue
        try:
            states.append(Path(item).read_bytes())
        except OSError as err:
            raise UserError(f"save state {item} cannot be read ({err.strerror}); make one with scripts/make_save_state.py") from None
    if not states:
        raise UserError("the list of save states is empty; pass at least one, or None to make one in memory")
    return states


def parse_resolution(text) -> tuple:
    """'144x160' (or a (H, W) tuple) -> (144, 160); UserError for anything else."""
    if isinstance(text, str):
        try:
            height, width = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise UserError(f"resolution '{text}' is not HxW, e.g. 144x160, 72x80 or 36x40") from None
    else:
        height, width = text
    if not (0 < height <= 144 and 0 < width <= 160):
        raise UserError(f"resolution {height}x{width} is outside 1..144 x 1..160; use e.g. 144x160, 72x80 or 36x40")
    return int(height), int(width)


@dataclass(frozen=True)
class RewardWeights:
    """Reward for one step = the sum of these weights times what happened during it.

    new_tile:   per (map, x, y) tile first stood on this episode, outside battle
    new_map:    per map first entered this episode (the start map counts as seen)
    battle_won: per battle that ended with the enemy Pokémon's HP at 0
    badge:      per badge bit newly set
    blackout:   when the whole party faints (use a negative weight to penalise)
    """

    new_tile: float = 0.1
    new_map: float = 1.0
    battle_won: float = 1.0
    badge: float = 10.0
    blackout: float = 0.0


class PokemonEnv(gym.Env):
    """Pokémon Red/Blue or the open cartridge as a Gymnasium env.

    obs: uint8 (H, W, 3) RGB at `resolution`; actions: Discrete(8) over ACTIONS.
    info["state"] is the GameState after the step; info also counts the episode's
    tiles, maps, battles won and the reward terms.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 60 / 24}

    def __init__(self, rom=DEFAULT_ROM, save_states=None, resolution=NATIVE_RESOLUTION, ticks_per_action=24,
                 episode_length=1000, reward_weights=None, terminate_on_blackout=True, start_state_count=1,
                 render_mode=None):
        if ticks_per_action < 2:
            raise UserError(f"ticks per action {ticks_per_action} is too small; use at least 2 (default 24)")
        if episode_length < 1:
            raise UserError(f"episode length {episode_length} must be at least 1")
        self.resolution = parse_resolution(resolution)
        self.ticks_per_action = int(ticks_per_action)
        self.episode_length = int(episode_length)
        self.reward_weights = reward_weights or RewardWeights()
        self._weights = asdict(self.reward_weights)
        self.terminate_on_blackout = terminate_on_blackout
        self.render_mode = render_mode
        self.pyboy, self.rom = open_emulator(rom)
        if save_states is None:
            self.start_states = make_start_states(self.pyboy, self.rom.game, start_state_count)
        else:
            self.start_states = read_state_files(save_states)
            self._check_states_load(save_states)
        self.observation_space = gym.spaces.Box(0, 255, (*self.resolution, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self.state = None

    def _check_states_load(self, sources) -> None:
        for source, data in zip(sources, self.start_states):
            try:
                load_state_bytes(self.pyboy, data)
            except Exception as err:  # PyBoy raises various errors on foreign data
                name = "given as bytes" if isinstance(source, (bytes, bytearray)) else str(source)
                raise UserError(f"save state {name} does not load in PyBoy ({err}); "
                                f"remake it with scripts/make_save_state.py for this ROM and PyBoy version") from None
            if not self._plausible_state():
                name = "given as bytes" if isinstance(source, (bytes, bytearray)) else str(source)
                raise UserError(f"save state {name} loads but is not a {self.rom.game} game in progress "
                                f"(made with another ROM?); remake it with scripts/make_save_state.py --rom {self.rom.path}")

    def _plausible_state(self) -> bool:
        """After loading a state: does RAM look like this game past its title screen?"""
        mem = self.pyboy.memory
        if self.rom.game == "cartridge":
            return mem[CARTRIDGE_GAME_MODE] in (2, 3, 4) and mem[ram.CUR_MAP] in ram.CARTRIDGE_MAP_NAMES
        return mem[ram.PARTY_COUNT] <= 6 and mem[ram.CUR_MAP] < 0xF8

    # --- observations -----------------------------------------------------------------
    def _observe(self) -> np.ndarray:
        frame = screen_rgb(self.pyboy)
        if self.resolution != NATIVE_RESOLUTION:
            frame = cv2.resize(frame, self.resolution[::-1], interpolation=cv2.INTER_AREA)
        return frame

    def render(self):
        return screen_rgb(self.pyboy)

    def _info(self, terms=None) -> dict:
        return {
            "state": self.state,
            "episode_step": self.episode_step,
            "tiles_seen": len(self.tiles_seen),
            "maps_seen": len(self.maps_seen),
            "battles_won": self.battles_won,
            "reward_terms": terms or {},
        }

    # --- gymnasium API ----------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        """Load a start state: options["state_index"] if given, else one drawn with the seed."""
        super().reset(seed=seed)
        options = options or {}
        index = options.get("state_index")
        if index is None:
            index = int(self.np_random.integers(len(self.start_states)))
        if not 0 <= index < len(self.start_states):
            raise UserError(f"state_index {index} is outside 0..{len(self.start_states) - 1}")
        self.start_index = index
        load_state_bytes(self.pyboy, self.start_states[index])
        self.pyboy.tick(1, True)  # the screen buffer is not part of a save state
        self.state = read_state(self.pyboy, self.rom.game)
        self.episode_step = 0
        self.tiles_seen = set()
        self.maps_seen = {self.state.map_id}
        if not self.state.in_battle:
            self.tiles_seen.add((self.state.map_id, self.state.x, self.state.y))
        self.battles_won = 0
        self.last_enemy_hp = self.state.enemy_hp
        return self._observe(), self._info()

    def step(self, action):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        before = self.state
        step_emulator(self.pyboy, int(action), self.ticks_per_action)
        self.state = after = read_state(self.pyboy, self.rom.game)
        self.episode_step += 1
        terms = self._reward_terms(before, after)
        reward = float(sum(self._weights[name] * count for name, count in terms.items()))
        terminated = bool(self.terminate_on_blackout and after.blacked_out)
        truncated = self.episode_step >= self.episode_length
        return self._observe(), reward, terminated, truncated, self._info(terms)

    def _reward_terms(self, before: GameState, after: GameState) -> dict:
        """Counts of the rewarded events of one step (keys = RewardWeights fields)."""
        terms = {"new_tile": 0, "new_map": 0, "battle_won": 0, "badge": 0, "blackout": 0}
        if before.in_battle:
            self.last_enemy_hp = before.enemy_hp
        if not after.in_battle:
            tile = (after.map_id, after.x, after.y)
            if tile not in self.tiles_seen:
                self.tiles_seen.add(tile)
                terms["new_tile"] = 1
            if before.in_battle and not after.blacked_out and self.last_enemy_hp == 0:
                terms["battle_won"] = 1
                self.battles_won += 1
        if after.map_id not in self.maps_seen:
            self.maps_seen.add(after.map_id)
            terms["new_map"] = 1
        terms["badge"] = bin(after.badges & ~before.badges & 0xFF).count("1")
        terms["blackout"] = int(after.blacked_out and not before.blacked_out)
        return terms

    def close(self):
        if getattr(self, "pyboy", None) is not None:
            self.pyboy.stop(save=False)
            self.pyboy = None
