"""env.py and game_state.py: ROM identification, stepping, observations, rewards, episode ends,
and Gymnasium's own env checker, on the open cartridge."""
import dataclasses
import hashlib

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ram_addresses as ram
from env import ACTIONS, PokemonEnv, RewardWeights, identify_rom, parse_resolution, step_emulator
from errors import UserError
from game_state import read_state, screen_rgb


def rom_with_header(size=32 * 1024, fix_checksum=True) -> bytearray:
    rom = bytearray(size)
    rom[0x134:0x13B] = b"NOTPKMN"
    checksum = 0
    for byte in rom[0x134:0x14D]:
        checksum = (checksum - byte - 1) & 0xFF
    rom[0x14D] = checksum if fix_checksum else checksum ^ 0xFF
    return rom


def test_identify_rom_refusals(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        identify_rom(tmp_path / "missing.gb")
    (tmp_path / "dir.gb").mkdir()
    with pytest.raises(UserError, match="cannot be read"):
        identify_rom(tmp_path / "dir.gb")
    (tmp_path / "short.gb").write_bytes(bytes(20000))
    with pytest.raises(UserError, match="20000 bytes, not a multiple of 16 KiB"):
        identify_rom(tmp_path / "short.gb")
    (tmp_path / "bad.gb").write_bytes(rom_with_header(fix_checksum=False))
    with pytest.raises(UserError, match="bad header checksum"):
        identify_rom(tmp_path / "bad.gb")
    (tmp_path / "other.gb").write_bytes(rom_with_header())
    with pytest.raises(UserError, match=r"other.gb \(title 'NOTPKMN'.*not a supported game.*Red or Blue"):
        identify_rom(tmp_path / "other.gb")


def test_identify_the_cartridge(cartridge_rom):
    info = identify_rom(cartridge_rom)
    assert info.game == "cartridge"
    assert info.sha1 == hashlib.sha1(cartridge_rom.read_bytes()).hexdigest()


def test_parse_resolution():
    assert parse_resolution("36x40") == (36, 40)
    with pytest.raises(UserError, match="not HxW"):
        parse_resolution("big")
    with pytest.raises(UserError, match="outside"):
        parse_resolution("300x400")


@pytest.fixture
def make_env(cartridge_rom, start_state):
    envs = []

    def make(**kwargs):
        env = PokemonEnv(rom=cartridge_rom, save_states=[start_state], **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def test_check_env_passes(make_env):
    check_env(make_env(episode_length=50, resolution="72x80", render_mode="rgb_array"))


def test_step_timing_screen_and_state(make_env):
    env = make_env()
    obs, info = env.reset(seed=0)
    assert obs.shape == (144, 160, 3) and obs.dtype == np.uint8
    assert info["state"].map_name in ram.CARTRIDGE_MAP_NAMES.values()
    before = env.pyboy.frame_count
    step_emulator(env.pyboy, ACTIONS.index("pass"), 24)
    step_emulator(env.pyboy, ACTIONS.index("down"), 24)
    assert env.pyboy.frame_count - before == 48
    frame = screen_rgb(env.pyboy)
    assert frame.flags.owndata and frame.shape == (144, 160, 3)
    copy = frame.copy()
    step_emulator(env.pyboy, ACTIONS.index("up"), 24)
    assert np.array_equal(frame, copy)  # not a view of the emulator's buffer
    env.pyboy.memory[ram.TEXT_BOX_ID] = 3
    assert read_state(env.pyboy).dialog_open
    env.pyboy.memory[ram.TEXT_BOX_ID] = 0
    assert not read_state(env.pyboy).dialog_open


def test_walking_earns_tile_rewards_with_configurable_weights(make_env):
    env = make_env(reward_weights=RewardWeights(new_tile=1.0, new_map=0.0, battle_won=0.0, badge=0.0))
    env.reset(seed=0)
    total, positions = 0.0, set()
    for action in [ACTIONS.index(a) for a in ("left", "left", "left", "right", "right", "right", "right", "down")]:
        _, reward, _, _, info = env.step(action)
        total += reward
        state = info["state"]
        positions.add((state.map_id, state.x, state.y))
        assert reward == info["reward_terms"]["new_tile"]
    assert total == info["tiles_seen"] - 1 >= 2
    silent = make_env(reward_weights=RewardWeights(new_tile=0.0, new_map=0.0, battle_won=0.0, badge=0.0))
    silent.reset(seed=0)
    assert sum(silent.step(ACTIONS.index("left"))[1] for _ in range(4)) == 0.0


def test_truncation_and_blackout(make_env):
    env = make_env(episode_length=3)
    env.reset(seed=0)
    ends = [env.step(ACTIONS.index("pass"))[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]

    for terminate in (True, False):
        env = make_env(terminate_on_blackout=terminate)
        env.reset(seed=0)
        memory = env.pyboy.memory
        memory[ram.PARTY_COUNT] = max(1, memory[ram.PARTY_COUNT])
        for address in ram.PARTY_HP:
            memory[address] = memory[address + 1] = 0
        _, _, terminated, truncated, info = env.step(ACTIONS.index("pass"))
        assert info["state"].blacked_out
        assert terminated is terminate and not truncated


def test_reset_picks_start_states(cartridge_rom, start_state):
    env = PokemonEnv(rom=cartridge_rom, save_states=[start_state, start_state], episode_length=10)
    try:
        first, _ = env.reset(seed=1)
        for _ in range(5):
            env.step(ACTIONS.index("left"))
        again, _ = env.reset(options={"state_index": 1})
        assert np.array_equal(first, again)  # both states are the same here
        assert env.start_index == 1
        with pytest.raises(UserError, match="state_index 2"):
            env.reset(options={"state_index": 2})
    finally:
        env.close()


def test_unloadable_save_state_is_a_user_error(cartridge_rom, tmp_path):
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="bad.state"):
        PokemonEnv(rom=cartridge_rom, save_states=[bad])


def test_reward_weights_are_documented():
    names = {f.name for f in dataclasses.fields(RewardWeights)}
    assert names == {"new_tile", "new_map", "battle_won", "badge", "blackout"}
    for name in names:
        assert f"{name}:" in RewardWeights.__doc__
