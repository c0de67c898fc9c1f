"""One snapshot of the game, read from the emulator's RAM in one call, and the screen as RGB.

The open cartridge keeps Pokémon Red's RAM layout, so one reader serves both games; only
the map names differ (`game` picks the table).
"""
from dataclasses import dataclass

import cv2
import numpy as np

import ram_addresses as ram

MAP_NAMES = {
    "cartridge": ram.CARTRIDGE_MAP_NAMES,
    "red": ram.POKERED_MAP_NAMES,
    "blue": ram.POKERED_MAP_NAMES,
}


@dataclass(frozen=True)
class GameState:
    """What the game is doing at one tick. Tile coordinates are on the current map."""

    map_id: int
    map_name: str            # "map 0x.." for ids the name table does not know
    x: int
    y: int
    facing: int              # 0 down, 4 up, 8 left, 12 right
    battle_kind: int         # raw wIsInBattle: 0 none, 1 wild, 2 trainer, 0xFF lost
    dialog_open: bool        # wTextBoxID != 0
    badges: int              # bitmask, bit 0 = first badge
    party_count: int
    party_hps: tuple         # 6 ints (slots past party_count are whatever RAM holds)
    party_max_hps: tuple     # 6 ints
    party_levels: tuple      # 6 ints
    enemy_hp: int            # wEnemyMonHP, meaningful while in battle

    @property
    def in_battle(self) -> bool:
        return self.battle_kind in (1, 2)

    @property
    def level(self) -> int:
        """Level of the lead party Pokémon (0 with an empty party)."""
        return self.party_levels[0] if self.party_count else 0

    @property
    def blacked_out(self) -> bool:
        """Every party Pokémon has fainted, or the battle was lost."""
        if self.battle_kind == 0xFF:
            return True
        count = min(self.party_count, 6)
        return count > 0 and all(hp == 0 for hp in self.party_hps[:count])


def _u16(memory, address: int) -> int:
    """A big-endian 16-bit number (Pokémon stores HP high byte first)."""
    return (memory[address] << 8) | memory[address + 1]


def read_state(pyboy, game: str = "cartridge") -> GameState:
    """Read the GameState from `pyboy`'s RAM; `game` is "cartridge", "red" or "blue"."""
    memory = pyboy.memory
    map_id = memory[ram.CUR_MAP]
    names = MAP_NAMES[game]
    return GameState(
        map_id=map_id,
        map_name=names.get(map_id, f"map 0x{map_id:02X}"),
        x=memory[ram.X_COORD],
        y=memory[ram.Y_COORD],
        facing=memory[ram.FACING],
        battle_kind=memory[ram.IS_IN_BATTLE],
        dialog_open=memory[ram.TEXT_BOX_ID] != 0,
        badges=memory[ram.OBTAINED_BADGES],
        party_count=memory[ram.PARTY_COUNT],
        party_hps=tuple(_u16(memory, a) for a in ram.PARTY_HP),
        party_max_hps=tuple(_u16(memory, a) for a in ram.PARTY_MAX_HP),
        party_levels=tuple(memory[a] for a in ram.PARTY_LEVEL),
        enemy_hp=_u16(memory, ram.ENEMY_MON_HP),
    )


def screen_rgb(pyboy) -> np.ndarray:
    """The last rendered frame as an owned (144, 160, 3) uint8 RGB array.

    `pyboy.screen.ndarray` is a view of a buffer the emulator overwrites on the next
    rendered frame (RGBA), so the RGB channels are copied out (cv2 does it ~40x faster
    than numpy's strided copy).
    """
    return cv2.cvtColor(pyboy.screen.ndarray, cv2.COLOR_RGBA2RGB)
