"""The open cartridge, played in a real PyBoy: movement, doors, text, battles, badge, determinism.

Each test starts from one start state (power-on, title, START) and presses buttons the way the
project's env does: press 8 frames, release, 24 frames per action.
"""
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from pyboy import PyBoy

import ram_addresses as ram
import save_states

ROOT = Path(__file__).resolve().parents[1]
ROM = ROOT / "cartridge" / "pokedreamer.gb"
GAME_MODE, MODE_OVERWORLD, MODE_BATTLE = save_states.CARTRIDGE_GAME_MODE, 2, 4
OAM = 0xFE00

pytestmark = pytest.mark.skipif(not ROM.exists(), reason="cartridge/pokedreamer.gb not built yet (make cartridge)")

# Scripted walks (direction, tiles), as cartridge/README.md describes them.
TOWN_TO_ROUTE = [("right", 3), ("up", 4), ("right", 3), ("up", 2)]          # ends on Route 1 at (5, 29)
ROUTE_TO_GYM = [("up", 11), ("right", 1), ("up", 3), ("left", 4), ("up", 5),
                ("right", 2), ("up", 6), ("right", 1), ("up", 1)]            # ends in the Gym at (4, 8)
TOWN_TO_LAB = [("down", 1), ("right", 6), ("down", 3), ("right", 6), ("up", 3)]  # through the lab door
ROUTE_TO_GRASS = [("up", 11), ("left", 2)]                                   # (3, 18), tall grass


def act(pb, button=None):
    """One env action: press 8 frames (None: no button), release, 24 frames in all."""
    if button:
        pb.button_press(button)
    pb.tick(8, False)
    if button:
        pb.button_release(button)
    pb.tick(15, False)
    pb.tick(1, True)


def where(pb):
    m = pb.memory
    return m[ram.CUR_MAP], m[ram.X_COORD], m[ram.Y_COORD]


def facing(pb):
    return ram.FACING_NAMES[pb.memory[ram.FACING]]


def hp(pb, address):
    return pb.memory[address] << 8 | pb.memory[address + 1]


def walk(pb, direction, tiles):
    """Walk `tiles` tiles (the first press may only turn); fail if the way is blocked."""
    for _ in range(tiles):
        before = where(pb)
        act(pb, direction)
        if where(pb) == before:
            act(pb, direction)
        assert where(pb) != before, f"blocked walking {direction} at {before}"


def follow(pb, route):
    for direction, tiles in route:
        walk(pb, direction, tiles)


def frame_digest(pb):
    return hashlib.sha1(pb.screen.ndarray.tobytes()).hexdigest()


def wait_for_battle_menu(pb):
    for _ in range(120):
        if pb.memory[GAME_MODE] == MODE_BATTLE:
            return
        pb.tick(1, False)
    raise AssertionError("battle screen did not appear")


def grass_until_battle(pb, max_actions=200):
    """Step back and forth in tall grass (x 1..3 on Route 1) until a wild battle starts."""
    for i in range(max_actions):
        act(pb, "left" if (i // 2) % 2 == 0 else "right")
        if pb.memory[ram.IS_IN_BATTLE]:
            wait_for_battle_menu(pb)
            return i
    raise AssertionError(f"no encounter in {max_actions} actions of tall grass")


@pytest.fixture(scope="module")
def start_state():
    pb = PyBoy(str(ROM), window="null", sound_emulated=False)
    save_states.cartridge_start(pb, seed_frames=0)
    data = save_states.save_state_bytes(pb)
    pb.stop(save=False)
    return data


@pytest.fixture
def pb(start_state):
    emulator = PyBoy(str(ROM), window="null", sound_emulated=False)
    save_states.load_state_bytes(emulator, start_state)
    yield emulator
    emulator.stop(save=False)


def test_header_title_and_checksum():
    rom = ROM.read_bytes()
    assert len(rom) == 32 * 1024
    assert rom[0x134:0x13F] == b"POKEDREAMER"
    assert rom[0x147] == 0x00  # ROM only
    checksum = 0
    for byte in rom[0x134:0x14D]:
        checksum = (checksum - byte - 1) & 0xFF
    assert rom[0x14D] == checksum


@pytest.mark.skipif(shutil.which("sdcc") is None or shutil.which("make") is None,
                    reason="SDCC (sm83) or make not installed: `make sdcc` installs SDCC")
def test_rebuild_is_byte_identical(tmp_path):
    out = tmp_path / "pokedreamer.gb"
    subprocess.run(["make", "-s", "-C", str(ROOT / "cartridge"), f"BUILD={tmp_path / 'build'}", f"OUT={out}"],
                   check=True, capture_output=True)
    assert out.read_bytes() == ROM.read_bytes()


def test_start_state(pb):
    m = pb.memory
    assert where(pb) == (0x00, 3, 5) and facing(pb) == "down"
    assert m[ram.TEXT_BOX_ID] == 0 and m[ram.IS_IN_BATTLE] == 0 and m[ram.OBTAINED_BADGES] == 0
    assert m[ram.PARTY_COUNT] == 1 and m[ram.PARTY_LEVEL[0]] == 5
    assert hp(pb, ram.PARTY_HP[0]) == hp(pb, ram.PARTY_MAX_HP[0]) == 25


def test_one_action_is_one_step_or_one_turn(pb):
    act(pb, "down")                                   # facing down: one step
    assert where(pb) == (0x00, 3, 6)
    assert pb.memory[ram.WALK_COUNTER] == 0           # the step finished inside the action
    act(pb, "right")                                  # another direction: turn only
    assert where(pb) == (0x00, 3, 6) and facing(pb) == "right"
    act(pb, "right")
    assert where(pb) == (0x00, 4, 6)
    act(pb)                                           # no button: nothing moves
    assert where(pb) == (0x00, 4, 6)


def test_holding_keeps_walking(pb):
    pb.button_press("down")
    pb.tick(48, False)                                # 3 steps of 16 frames
    pb.button_release("down")
    pb.tick(24, False)
    assert where(pb) == (0x00, 3, 8)


def test_walls_and_trees_block(pb):
    walk(pb, "left", 1)                               # (2, 5)
    act(pb, "up")
    assert facing(pb) == "up"
    act(pb, "up")                                     # (2, 4) is the house wall
    assert where(pb) == (0x00, 2, 5)
    walk(pb, "left", 1)                               # (1, 5)
    act(pb, "left")                                   # (0, 5) is a tree
    assert where(pb) == (0x00, 1, 5)


def test_screen_scrolls_with_player_centred(pb):
    m = pb.memory
    scx0 = m[0xFF43]
    pb.button_press("down")
    pb.tick(1, False)
    pb.button_release("down")                         # facing down already: one step
    scys, oam = [], []
    for _ in range(20):
        pb.tick(1, False)
        scys.append(m[0xFF42])
        oam.append((m[OAM], m[OAM + 1]))
    assert len(set(scys)) >= 15                       # the background moved a pixel a frame
    assert (scys[-1] - scys[0]) % 256 == 16 and m[0xFF43] == scx0
    assert set(oam) == {(64 + 16, 64 + 8)}            # the player sprite never moved
    assert (m[ram.SPRITE_Y_PIXELS], m[ram.SPRITE_X_PIXELS]) == (64, 64)


def test_doors_and_edge_connection(pb):
    act(pb, "up")
    act(pb, "up")                                     # into the house door
    assert where(pb) == (0x01, 3, 5)
    act(pb, "down")
    act(pb, "down")                                   # onto the exit mat
    assert where(pb) == (0x00, 3, 5)
    follow(pb, TOWN_TO_ROUTE)
    assert where(pb) == (0x03, 5, 29)
    walk(pb, "down", 1)                               # back across the edge
    assert where(pb) == (0x00, 9, 0)


def test_text_box_freezes_movement(pb):
    walk(pb, "down", 1)
    walk(pb, "right", 1)                              # (4, 6), the town sign is at (4, 7)
    act(pb, "down")
    assert facing(pb) == "down"
    act(pb, "a")
    assert pb.memory[ram.TEXT_BOX_ID] == 1
    act(pb, "left")
    act(pb, "left")
    assert where(pb) == (0x00, 4, 6) and facing(pb) == "down"
    act(pb, "a")
    assert pb.memory[ram.TEXT_BOX_ID] == 0
    act(pb, "start")                                  # START menu: open, then B closes it
    assert pb.memory[ram.TEXT_BOX_ID] == 2
    act(pb, "b")
    assert pb.memory[ram.TEXT_BOX_ID] == 0


def test_npcs_wander_and_block(pb):
    m = pb.memory
    npc_positions = set()
    for _ in range(40):
        act(pb)
        npc_positions.add((m[0xC214], m[0xC215], m[0xC224], m[0xC225]))
    assert len(npc_positions) > 1                     # town NPCs moved while the player stood
    assert where(pb) == (0x00, 3, 5)
    follow(pb, TOWN_TO_LAB)
    assert where(pb) == (0x02, 4, 6)
    walk(pb, "up", 3)                                 # (4, 3), the professor stands at (4, 2)
    act(pb, "up")
    assert where(pb) == (0x02, 4, 3)


def test_wild_battles_run_win_and_blackout(pb):
    m = pb.memory
    follow(pb, TOWN_TO_ROUTE + ROUTE_TO_GRASS)
    assert where(pb) == (0x03, 3, 18)
    grass_until_battle(pb)
    assert m[ram.IS_IN_BATTLE] == 1 and hp(pb, ram.ENEMY_MON_HP) > 0
    act(pb, "right")                                  # cursor to RUN
    act(pb, "a")
    assert m[ram.IS_IN_BATTLE] == 0 and hp(pb, ram.ENEMY_MON_HP) > 0  # escaped

    grass_until_battle(pb)
    fights = 0
    while m[ram.IS_IN_BATTLE]:
        act(pb, "a")                                  # FIGHT, then A leaves the won battle
        fights += 1
        assert fights < 10
    assert hp(pb, ram.ENEMY_MON_HP) == 0              # won: the enemy's HP is 0 at the end
    assert m[ram.PARTY_LEVEL[0]] == 6 and hp(pb, ram.PARTY_MAX_HP[0]) == 28

    m[ram.PARTY_HP[0]], m[ram.PARTY_HP[0] + 1] = 0, 1  # 1 HP left: the next battle is lost
    grass_until_battle(pb)
    act(pb, "a")
    assert hp(pb, ram.PARTY_HP[0]) == 0
    act(pb, "a")
    act(pb)
    assert m[ram.IS_IN_BATTLE] == 0 and m[ram.CUR_MAP] == 0x01        # blacked out: home
    assert hp(pb, ram.PARTY_HP[0]) == hp(pb, ram.PARTY_MAX_HP[0])


def test_route_to_the_badge(pb):
    m = pb.memory
    follow(pb, TOWN_TO_ROUTE + ROUTE_TO_GYM)
    assert where(pb) == (0x04, 4, 8)
    walk(pb, "up", 5)                                 # below the leader
    act(pb, "a")
    assert m[ram.TEXT_BOX_ID] == 1
    act(pb, "a")                                      # closing the text starts the battle
    wait_for_battle_menu(pb)
    assert m[ram.IS_IN_BATTLE] == 2
    for _ in range(12):
        act(pb, "a")
        if not m[ram.IS_IN_BATTLE]:
            break
    assert m[ram.IS_IN_BATTLE] == 0 and hp(pb, ram.ENEMY_MON_HP) == 0
    assert m[ram.OBTAINED_BADGES] & 1


ACTIONS = ["down", "right", "right", "a", "b", "up", "up", "start", "start", "left", None, "down"] * 4


def play(pb, actions):
    digests = []
    for button in actions:
        act(pb, button)
        digests.append(frame_digest(pb))
    return digests


def test_same_state_same_inputs_same_frames(pb, start_state):
    first = play(pb, ACTIONS)
    save_states.load_state_bytes(pb, start_state)
    assert play(pb, ACTIONS) == first


def npc_walks(pb, actions):
    """Where the town's two NPCs stand (Pokemon's sprite MapY/MapX bytes) after each action."""
    m = pb.memory
    positions = []
    for button in actions:
        act(pb, button)
        positions.append((m[0xC214], m[0xC215], m[0xC224], m[0xC225]))
    return positions


def test_different_start_states_differ(pb):
    other = PyBoy(str(ROM), window="null", sound_emulated=False)
    try:
        save_states.cartridge_start(other, seed_frames=5)
        random = slice(save_states.CARTRIDGE_RANDOM, save_states.CARTRIDGE_RANDOM + 2)
        assert other.memory[random] != pb.memory[random]
        assert npc_walks(other, ACTIONS) != npc_walks(pb, ACTIONS)   # NPCs wander differently
    finally:
        other.stop(save=False)


def test_make_save_state_script(tmp_path):
    from scripts import make_save_state

    make_save_state.main(["--rom", str(ROM), "--out", str(tmp_path / "start.state"), "--count", "2"])
    states = [(tmp_path / f"start_{i}.state").read_bytes() for i in range(2)]
    assert states[0] != states[1]
    assert not list(tmp_path.glob("*.tmp"))
    emulator = PyBoy(str(ROM), window="null", sound_emulated=False)
    try:
        save_states.load_state_bytes(emulator, states[1])
        act(emulator, "down")
        assert where(emulator) == (0x00, 3, 6)
    finally:
        emulator.stop(save=False)
