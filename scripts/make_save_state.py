"""Write start save states: the open cartridge past its title screen, or Red/Blue in Pallet Town.

    python scripts/make_save_state.py                       # saves/start.state from the cartridge
    python scripts/make_save_state.py --count 8             # saves/start_0.state ... start_7.state
    python scripts/make_save_state.py --rom red.gb --out saves/red.state

With --count N > 1 each state waits a different number of frames on the cartridge's title
screen, so its random numbers differ (Red/Blue states are all the same intro).
States are tied to the PyBoy version that wrote them.
"""
import argparse
from pathlib import Path

from pyboy import PyBoy

import artifacts
import env
import save_states
from errors import UserError, cli

SEED_FRAME_STRIDE = 17  # title-screen frames between successive states


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rom", type=Path, default=env.DEFAULT_ROM,
                        help="ROM: the open cartridge (default) or your own Pokémon Red/Blue")
    parser.add_argument("--out", type=Path, default=Path("saves/start.state"),
                        help="state file to write; with --count N > 1, start_0.state ... next to it")
    parser.add_argument("--count", type=int, default=1,
                        help="number of different start states to write")
    args = parser.parse_args(argv)
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    return args


def output_paths(out: Path, count: int) -> list:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


@cli
def main(argv=None):
    args = parse_args(argv)
    info = env.identify_rom(args.rom)
    for index, path in enumerate(output_paths(args.out, args.count)):
        pyboy = PyBoy(str(info.path), window="null", sound_emulated=False)
        try:
            if info.game == "cartridge":
                save_states.cartridge_start(pyboy, seed_frames=SEED_FRAME_STRIDE * index)
            else:
                save_states.pokered_intro(pyboy)
            data = save_states.save_state_bytes(pyboy)
        finally:
            pyboy.stop(save=False)
        artifacts.write_bytes(path, data)
        print(f"wrote {path} ({info.game}, {len(data)} bytes)")


if __name__ == "__main__":
    main()
