"""Screenshots of the open cartridge's maps, a text box and a battle, as one PNG sheet for the README."""
import argparse
import numpy as np

import artifacts
import save_states
from env import ACTIONS, DEFAULT_ROM, open_emulator, step_emulator
from errors import UserError, cli
from game_state import read_state, screen_rgb

# Walks in (direction, tiles) pairs from the new-game start (3, 5) in Dream Town (cartridge/README.md).
TOWN_TO_ROUTE = [("right", 3), ("up", 4), ("right", 3), ("up", 2)]
ROUTE_TO_GYM = [("up", 11), ("right", 1), ("up", 3), ("left", 4), ("up", 5), ("right", 2), ("up", 6),
                ("right", 1), ("up", 1)]
TOWN_TO_LAB = [("down", 1), ("right", 6), ("down", 3), ("right", 6), ("up", 3)]
TOWN_TO_HOUSE = [("up", 1)]
ROUTE_TO_GRASS = [("up", 11), ("left", 2)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="the open cartridge (.gb)")
    p.add_argument("--out", default="docs/cartridge.png", help="output PNG sheet")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour scale of each screenshot")
    return p.parse_args()


def press(pyboy, name):
    step_emulator(pyboy, ACTIONS.index(name))


def walk(pyboy, route):
    """Follow a route; the first press of a new direction may only turn the player."""
    for direction, tiles in route:
        for _ in range(tiles):
            before = read_state(pyboy)
            press(pyboy, direction)
            after = read_state(pyboy)
            if (after.map_id, after.x, after.y) == (before.map_id, before.x, before.y):
                press(pyboy, direction)


@cli
def main():
    args = parse_args()
    pyboy, rom = open_emulator(args.rom)
    if rom.game != "cartridge":
        raise UserError(f"{args.rom} is {rom.game}, not the open cartridge; screenshots follow the cartridge's maps")
    save_states.cartridge_start(pyboy, seed_frames=0)
    start = save_states.save_state_bytes(pyboy)
    shots = []

    def shot(title, route=(), then=()):
        save_states.load_state_bytes(pyboy, start)
        walk(pyboy, route)
        for action in then:
            press(pyboy, action)
        shots.append(artifacts.panel(screen_rgb(pyboy), title, scale=args.scale))

    shot("Dream Town (0x00)")
    shot("Player's House (0x01)", TOWN_TO_HOUSE + [("up", 2)])
    shot("Lab (0x02)", TOWN_TO_LAB + [("up", 2)], then=["up", "a"])
    shot("Route 1 (0x03)", TOWN_TO_ROUTE + [("up", 8)])
    shot("Gym (0x04)", TOWN_TO_ROUTE + ROUTE_TO_GYM + [("up", 2)])
    shot("START menu", then=["start"])
    # a wild battle: walk up and down in the tall grass until one starts
    save_states.load_state_bytes(pyboy, start)
    walk(pyboy, TOWN_TO_ROUTE + ROUTE_TO_GRASS)
    for i in range(200):
        walk(pyboy, [("up" if i % 2 else "down", 1)])
        if read_state(pyboy).in_battle:
            break
    else:
        raise UserError("no wild battle in 200 steps of tall grass: has the cartridge changed?")
    for _ in range(4):
        press(pyboy, "pass")
    shots.append(artifacts.panel(screen_rgb(pyboy), "wild battle", scale=args.scale))
    pyboy.stop(save=False)

    rows = [artifacts.side_by_side(shots[i:i + 4]) for i in range(0, len(shots), 4)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=40) for r in rows]
    sheet = np.concatenate(rows, 0)
    artifacts.write_image(args.out, sheet)
    print(f"wrote {args.out} ({len(shots)} screenshots)")


if __name__ == "__main__":
    main()
