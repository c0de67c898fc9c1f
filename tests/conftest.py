"""Make the repository's top-level modules importable from the tests; shared session fixtures.

cartridge_rom   Path of cartridge/pokedreamer.gb (the test skips while it is not built)
start_state     bytes of a cartridge start state, made once per session
collected_data  collected_data("36x40") -> Path of a data folder of 600 real steps
                (3 episodes of 200, 2 chunks), collected once per session and resolution
                by scripts/collect_data.py --policy explore --seed 0
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CARTRIDGE = REPO / "cartridge" / "pokedreamer.gb"
FIXTURE_STEPS = 600
FIXTURE_EPISODE_LENGTH = 200


def run_script(script: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """Run scripts/<script> with this interpreter; returns the finished process (not checked)."""
    command = [sys.executable, str(REPO / "scripts" / script), *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


_SCRIPTS = {}


def load_script(name: str):
    """scripts/<name>.py imported as a module (once), so its functions and main() run in this process."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


@pytest.fixture(scope="session")
def cartridge_rom() -> Path:
    if not CARTRIDGE.exists():
        pytest.skip("cartridge/pokedreamer.gb is not built yet")
    return CARTRIDGE


@pytest.fixture(scope="session")
def start_state(cartridge_rom) -> bytes:
    from env import make_start_states, open_emulator

    pyboy, rom = open_emulator(cartridge_rom)
    try:
        return make_start_states(pyboy, rom.game, count=1)[0]
    finally:
        pyboy.stop(save=False)


@pytest.fixture(scope="session")
def start_state_file(start_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saves") / "start.state"
    path.write_bytes(start_state)
    return path


@pytest.fixture(scope="session")
def collected_data(cartridge_rom, start_state_file, tmp_path_factory):
    folders = {}

    def collect(resolution: str = "144x160") -> Path:
        if resolution not in folders:
            out = tmp_path_factory.mktemp(f"data_{resolution}")
            done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", out,
                              "--total-steps", FIXTURE_STEPS, "--episode-length", FIXTURE_EPISODE_LENGTH,
                              "--save-interval", FIXTURE_STEPS // 2, "--seed", 0, "--resolution", resolution,
                              "--policy", "explore", "--save-state", start_state_file)
            assert done.returncode == 0, done.stderr[-3000:]
            folders[resolution] = out
        return folders[resolution]

    return collect
