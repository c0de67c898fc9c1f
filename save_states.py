"""Bring a live PyBoy to a start state, and move states in and out of memory.

- `cartridge_start(pyboy, seed_frames)`: the open cartridge from power-on to the first frame
  where the player can walk in Dream Town. The cartridge's PRNG advances every frame, also
  on the title screen, so each `seed_frames` gives a different game.
- `pokered_intro(pyboy)`: a user's Pokémon Red/Blue from power-on through the intro and
  naming to Pallet Town, checking the map id at each stage.
- `save_state_bytes(pyboy)` / `load_state_bytes(pyboy, data)`: PyBoy states as bytes.

This module drives the emulator directly (it does not import env.py).
"""
import io

import ram_addresses as ram
from errors import UserError

# Cartridge-only RAM (cartridge/README.md): the game mode byte and the PRNG state.
CARTRIDGE_RANDOM = 0xD900        # xorshift16 state, 2 bytes little-endian
CARTRIDGE_GAME_MODE = 0xD902     # 0 boot, 1 title, 2 overworld, 3 battle transition, 4 battle
MODE_TITLE, MODE_OVERWORLD = 1, 2

PRESS_FRAMES = 8                 # the project's action: press 8 frames, 24 frames in all
ACTION_FRAMES = 24


def save_state_bytes(pyboy):
    """The emulator's full state as bytes."""
    buffer = io.BytesIO()
    pyboy.save_state(buffer)
    return buffer.getvalue()


def load_state_bytes(pyboy, data):
    """Restore a state made by `save_state_bytes` (same PyBoy version)."""
    buffer = io.BytesIO(data)
    buffer.seek(0)
    pyboy.load_state(buffer)


def press(pyboy, button, frames=ACTION_FRAMES):
    """Press `button` for 8 frames, then run to `frames` frames in all; render the last one."""
    pyboy.button_press(button)
    pyboy.tick(PRESS_FRAMES, False)
    pyboy.button_release(button)
    pyboy.tick(frames - PRESS_FRAMES - 1, False)
    pyboy.tick(1, True)


def _run_until(pyboy, done, max_frames, what):
    for _ in range(max_frames):
        if done():
            return
        pyboy.tick(1, False)
    if not done():
        raise UserError(f"{what} did not happen within {max_frames} frames: is this the PokéDreamer "
                        "cartridge (cartridge/pokedreamer.gb)? Rebuild it with `make cartridge`.")


def cartridge_start(pyboy, seed_frames=0):
    """Power-on -> title screen -> wait `seed_frames` -> START -> player free in Dream Town."""
    if seed_frames < 0:
        raise UserError(f"seed_frames must be >= 0, got {seed_frames}")
    mem = pyboy.memory
    _run_until(pyboy, lambda: mem[CARTRIDGE_GAME_MODE] == MODE_TITLE, 600, "the title screen")
    pyboy.tick(seed_frames + 1, False)
    pyboy.button_press("start")
    pyboy.tick(PRESS_FRAMES, False)
    pyboy.button_release("start")
    _run_until(pyboy, lambda: (mem[CARTRIDGE_GAME_MODE] == MODE_OVERWORLD and mem[ram.CUR_MAP] == 0x00
                               and mem[ram.TEXT_BOX_ID] == 0), 120, "entering Dream Town")
    pyboy.tick(ACTION_FRAMES - PRESS_FRAMES - 1, False)  # let the first overworld frame be drawn
    pyboy.tick(1, True)


# --- Pokémon Red/Blue ----------------------------------------------------------------------
BEDROOM, LIVING_ROOM, PALLET_TOWN = 0x26, 0x25, 0x00
STAIRS = (7, 1)          # the bedroom's stairs down (a warp tile)
FRONT_DOOR = (3, 7)      # the living room's door mat; pressing down on it leaves the house
DIRECTIONS = ("up", "down", "left", "right")


def screen_text(pyboy):
    """Letters on Red's screen tile buffer (wTileMap): 0x80-0x99 are A-Z, 0x7F is a space."""
    tiles = pyboy.memory[ram.TILE_MAP:ram.TILE_MAP + ram.TILE_MAP_SIZE]
    return "".join(chr(ord("A") + t - 0x80) if 0x80 <= t <= 0x99 else " " for t in tiles)


def _position(pyboy):
    mem = pyboy.memory
    return mem[ram.CUR_MAP], mem[ram.X_COORD], mem[ram.Y_COORD]


def _failed(pyboy, step, detail):
    cur_map, x, y = _position(pyboy)
    return UserError(f"pokered_intro: step '{step}' failed ({detail}; now on map 0x{cur_map:02X} at ({x}, {y})). "
                     "Is this Pokémon Red/Blue (USA, Europe) with no other save? Make the state by hand "
                     "in PyBoy and pass it with --save-state instead.")


def _choose_menu_item(pyboy, item, step):
    """Move the cursor of an open list menu to `item` (wCurrentMenuItem) and press A."""
    for _ in range(6):
        current = pyboy.memory[ram.CURRENT_MENU_ITEM]
        if current == item:
            press(pyboy, "a")
            return
        press(pyboy, "down" if current < item else "up")
    raise _failed(pyboy, step, f"menu cursor did not reach item {item}")


def _try_walk(pyboy, direction):
    """Press `direction` (twice: the first press may only turn); True if the player moved."""
    before = _position(pyboy)
    press(pyboy, direction)
    press(pyboy, direction)
    return _position(pyboy) != before


def _walk_to(pyboy, target, leave_map, step, max_moves=60):
    """Greedy walk toward `target` (x, y) until the map id is no longer `leave_map`: the axis
    with the longer way first, then the other, then the remaining directions (sidesteps).
    Standing on the target it keeps pressing down (door mats are left by walking down)."""
    for _ in range(max_moves):
        _, x, y = _position(pyboy)
        dx, dy = target[0] - x, target[1] - y
        horizontal = "right" if dx > 0 else "left"
        vertical = "down" if dy >= 0 else "up"
        order = [horizontal, vertical] if abs(dx) > abs(dy) else [vertical, horizontal]
        order += [d for d in DIRECTIONS if d not in order]
        for direction in order:
            if _try_walk(pyboy, direction) or pyboy.memory[ram.CUR_MAP] != leave_map:
                break
        if pyboy.memory[ram.CUR_MAP] != leave_map:
            return
    raise _failed(pyboy, step, f"did not leave map 0x{leave_map:02X} toward {target} in {max_moves} moves")


def pokered_intro(pyboy, max_actions=400):
    """Power-on -> title -> NEW GAME -> Oak's speech with preset names (RED, BLUE) ->
    bedroom (0x26) -> stairs -> living room (0x25) -> door -> Pallet Town (0x00)."""
    step = "title screen to the main menu"
    for _ in range(max_actions):
        text = screen_text(pyboy)
        if "NEW GAME" in text:
            break
        press(pyboy, "start")
    else:
        raise _failed(pyboy, step, "no NEW GAME menu appeared")
    _choose_menu_item(pyboy, 1 if "CONTINUE" in screen_text(pyboy) else 0, "choose NEW GAME")

    step = "Oak's speech and naming"
    names_chosen = 0
    for _ in range(max_actions):
        if "NEW NAME" in screen_text(pyboy):
            _choose_menu_item(pyboy, 1, f"choose preset name {names_chosen + 1}")  # RED, then BLUE
            names_chosen += 1
            pyboy.tick(2 * ACTION_FRAMES, False)      # let the name list close
            continue
        if names_chosen == 2 and pyboy.memory[ram.CUR_MAP] == BEDROOM:
            if any(_try_walk(pyboy, d) for d in ("down", "left", "right", "up")):
                break                                  # the player walks: the intro is over
        press(pyboy, "a")
    else:
        raise _failed(pyboy, step, f"not free to walk in the bedroom (0x26) after {max_actions} presses, "
                                   f"{names_chosen} of 2 names chosen")

    _walk_to(pyboy, STAIRS, BEDROOM, "bedroom to the stairs")
    if pyboy.memory[ram.CUR_MAP] != LIVING_ROOM:
        raise _failed(pyboy, "bedroom to the stairs", "the stairs did not lead to the living room (0x25)")
    _walk_to(pyboy, FRONT_DOOR, LIVING_ROOM, "living room to the front door")
    if pyboy.memory[ram.CUR_MAP] != PALLET_TOWN:
        raise _failed(pyboy, "living room to the front door", "the door did not lead to Pallet Town (0x00)")
    pyboy.tick(ACTION_FRAMES, True)
