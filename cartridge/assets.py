"""Generate the cartridge's graphics and map tables as C source (build/assets.c, build/assets.h).

All art is drawn here as text, one character per pixel, in the four DMG shades:
    '.' white (sprites: transparent)   ':' light grey   'o' dark grey   '#' black
Maps are drawn as text too, one character per 16x16 block (legend in BLOCK_CHARS).
Run: python3 assets.py OUTDIR   (the Makefile does this; output is deterministic).
"""
import sys
from collections import deque
from pathlib import Path

from font import GLYPHS

SHADE = {".": 0, ":": 1, "o": 2, "#": 3}


def art(text):
    """Rows of a drawing (blank lines and surrounding whitespace removed)."""
    rows = [row.strip() for row in text.strip().splitlines() if row.strip()]
    width = len(rows[0])
    assert all(len(r) == width for r in rows), f"ragged art: {[len(r) for r in rows]}"
    return rows


def tile_bytes(rows):
    """One 8x8 tile (8 rows of 8 shade characters) -> 16 bytes of 2bpp Game Boy tile data."""
    assert len(rows) == 8 and all(len(r) == 8 for r in rows)
    out = []
    for row in rows:
        low = high = 0
        for x, ch in enumerate(row):
            shade = SHADE[ch]
            low |= (shade & 1) << (7 - x)
            high |= (shade >> 1) << (7 - x)
        out += [low, high]
    return tuple(out)


def cut(rows, x, y):
    """The 8x8 tile at pixel (x, y) of a drawing."""
    return [r[x:x + 8] for r in rows[y:y + 8]]


def mirror(rows):
    return [r[::-1] for r in rows]


# ---------------------------------------------------------------------------------------
# Background blocks (16x16). A block given as 8x8 is repeated 2x2.
# ---------------------------------------------------------------------------------------
def repeat8(text):
    rows = art(text)
    return [r + r for r in rows] * 2


BLOCK_ART = {}

BLOCK_ART["GRASS"] = art("""
................
..:.............
.:.:......:.....
..........:.:...
................
.....:..........
....:.:.....:...
...........:.:..
................
.:..............
:.:.......:.....
.........:.:....
................
......:.........
.....:.:....:...
...........:.:..
""")
BLOCK_ART["FLOWER"] = repeat8("""
........
..o.....
.o:o....
..o.....
......o.
.....o:o
......o.
........
""")
BLOCK_ART["PATH"] = repeat8("""
::::::::
:::::o::
::::::::
:o::::::
::::::::
::::::::
::::o:::
::::::::
""")
BLOCK_ART["TREE"] = art("""
.....######.....
...##oooooo##...
..#oo:oooo:oo#..
.#o:oooooooo:o#.
.#oooo:oo:oooo#.
#o:oooooooooo:o#
#oooo:oooo:oooo#
#oo:oooooooo:oo#
#ooooo:oo:ooooo#
.#o:oooooooo:o#.
.#oooooooooooo#.
..##oooooooo##..
....###oo###....
......#oo#......
......#oo#......
.....######.....
""")
BLOCK_ART["WATER"] = repeat8("""
oooooooo
o::ooooo
:oo:oooo
oooooooo
oooooooo
ooooo::o
oooo:oo:
oooooooo
""")
BLOCK_ART["ROOF"] = repeat8("""
oooooooo
########
oo#ooo#o
oo#ooo#o
oooooooo
########
o#ooo#oo
o#ooo#oo
""")
BLOCK_ART["WALL"] = art("""
################
::::::::::::::::
::::######::::::
::::#..#.#::::::
::::#..#.#::::::
::::######::::::
::::#..#.#::::::
::::######::::::
::::::::::::::::
oooooooooooooooo
::::::::::::::::
::::::::::::::::
oooooooooooooooo
::::::::::::::::
::::::::::::::::
################
""")
BLOCK_ART["DOOR"] = art("""
################
:::##########:::
:::#oooooooo#:::
:::#o######o#:::
:::#o#oooo#o#:::
:::#o#oooo#o#:::
:::#o######o#:::
:::#oooooooo#:::
:::#oooooooo#:::
:::#ooooo##o#:::
:::#oooooooo#:::
:::#oooooooo#:::
:::#oooooooo#:::
:::#oooooooo#:::
:::#oooooooo#:::
################
""")
BLOCK_ART["TALLGRASS"] = repeat8("""
.o...o..
o#o.o#o.
#:#o#:#o
:::::::.
o...o...
#o.o#o.o
:#o#:#o#
.::.::::
""")
BLOCK_ART["SIGN"] = art("""
................
.##############.
.#::::::::::::#.
.#:oo:ooo:oo:.#.
.#::::::::::::#.
.#:ooo:o:ooo::#.
.#::::::::::::#.
.##############.
......#oo#......
......#oo#......
......#oo#......
......#oo#......
.....##oo##.....
................
................
................
""")
BLOCK_ART["FLOOR"] = repeat8("""
::::::::
::::::::
::::::::
oooooooo
::::o:::
::::o:::
::::o:::
oooooooo
""")
BLOCK_ART["IWALL"] = repeat8("""
oooooooo
oooooooo
#ooo#ooo
oooooooo
oooooooo
oo#ooo#o
oooooooo
########
""")
BLOCK_ART["BED"] = art("""
################
#..............#
#.oooooooooooo.#
#.o..........o.#
#.oooooooooooo.#
#..............#
################
#oooooooooooooo#
#o:::::::::::::#
#o::o::::o:::::#
#o:::::::::::::#
#o:::o::::::o::#
#o:::::::::::::#
#oooooooooooooo#
################
::::::::::::::::
""")
BLOCK_ART["TABLE"] = art("""
::::::::::::::::
.##############.
.#oooooooooooo#.
.#o..........o#.
.#o..........o#.
.#oooooooooooo#.
.##############.
.#o#::::::::#o#.
.#o#::::::::#o#.
.#o#::::::::#o#.
.###::::::::###.
::::::::::::::::
::::::::::::::::
::::::::::::::::
::::::::::::::::
::::::::::::::::
""")
BLOCK_ART["MAT"] = art("""
::::::::::::::::
::::::::::::::::
:##############:
:#oooooooooooo#:
:#o#o#o#o#o#oo#:
:#oooooooooooo#:
:#oo#o#o#o#o#o#:
:#oooooooooooo#:
:#o#o#o#o#o#oo#:
:#oooooooooooo#:
:##############:
::::::::::::::::
::::::::::::::::
::::::::::::::::
::::::::::::::::
::::::::::::::::
""")
BLOCK_ART["VOID"] = repeat8("\n".join(["########"] * 8))
BLOCK_ART["MACHINE"] = art("""
################
#oooooooooooooo#
#o############o#
#o#..........#o#
#o#.o..o.....#o#
#o#..........#o#
#o#....o..o..#o#
#o############o#
#oooooooooooooo#
#o:o:o:oo#o#oo:#
#oooooooooooooo#
#o::::::::::::o#
#oooooooooooooo#
################
::::::::::::::::
::::::::::::::::
""")
BLOCK_ART["GYMROOF"] = repeat8("""
########
#oo##oo#
#oo##oo#
########
##oo##oo
##oo##oo
########
oooooooo
""")
BLOCK_ART["STATUE"] = art("""
::::::####::::::
:::::#oooo#:::::
::::#o.oo.o#::::
::::#oooooo#::::
:::::#oooo#:::::
::::########::::
::::#o::::o#::::
::::#o::::o#::::
::::#o::::o#::::
::::#o::::o#::::
::::#o::::o#::::
:::##########:::
:::#oooooooo#:::
:::##########:::
::::::::::::::::
::::::::::::::::
""")

# Block ids (the order is the id), whether each one blocks the player, and its map character.
BLOCKS = [
    # name,       solid, char
    ("GRASS",     0, "."),
    ("FLOWER",    0, ","),
    ("PATH",      0, "="),
    ("TREE",      1, "T"),
    ("WATER",     1, "~"),
    ("ROOF",      1, "R"),
    ("WALL",      1, "W"),
    ("DOOR",      0, "D"),
    ("TALLGRASS", 0, '"'),
    ("SIGN",      1, "S"),
    ("FLOOR",     0, "_"),
    ("IWALL",     1, "I"),
    ("BED",       1, "B"),
    ("TABLE",     1, "t"),
    ("MAT",       0, "M"),
    ("VOID",      1, "V"),
    ("MACHINE",   1, "P"),
    ("GYMROOF",   1, "Y"),
    ("STATUE",    1, "o"),
]
BLOCK_ID = {name: i for i, (name, _, _) in enumerate(BLOCKS)}
BLOCK_CHARS = {ch: i for i, (_, _, ch) in enumerate(BLOCKS)}

# ---------------------------------------------------------------------------------------
# UI tiles (8x8): text-box border, HP bar, cursor comes from the font ('>').
# ---------------------------------------------------------------------------------------
BOX_TILES = {
    "BOX_TL": "........ ........ ........ ...##### ...#.... ...#.... ...#.... ...#....",
    "BOX_T":  "........ ........ ........ ######## ........ ........ ........ ........",
    "BOX_TR": "........ ........ ........ #####... ....#... ....#... ....#... ....#...",
    "BOX_L":  "...#.... ...#.... ...#.... ...#.... ...#.... ...#.... ...#.... ...#....",
    "BOX_R":  "....#... ....#... ....#... ....#... ....#... ....#... ....#... ....#...",
    "BOX_BL": "...#.... ...#.... ...#.... ...#.... ...##### ........ ........ ........",
    "BOX_B":  "........ ........ ........ ........ ######## ........ ........ ........",
    "BOX_BR": "....#... ....#... ....#... ....#... #####... ........ ........ ........",
    "HP_LABEL": "........ #.#.##.. #.#.#.#. ###.##.. #.#.#... #.#.#... ........ ........",
    "BAR_L":  "........ .......# .......# .......# .......# .......# ........ ........",
    "BAR_R":  "........ #....... #....... #....... #....... #....... ........ ........",
}


def bar_tile(filled):
    """A segment of the HP bar with `filled` (0..8) dark pixels from the left."""
    rows = ["########"]
    for _ in range(3):
        rows.append("o" * filled + "." * (8 - filled))
    rows.append("########")
    return ["........"] + rows + ["........", "........"]


# ---------------------------------------------------------------------------------------
# Characters (16x16 sprites, drawn in 8x16 OBJ mode). Shades select the OBJ palette entry.
# ---------------------------------------------------------------------------------------
PLAYER = {
    "down": """
.....######.....
....#oooooo#....
...#oooooooo#...
...#oooooooo#...
..############..
...#::::::::#...
...#:#::::#:#...
...#:#::::#:#...
....#::::::#....
...##########...
..#:#oooooo#:#..
..#:#oooooo#:#..
...##oooooo##...
....#oooooo#....
....#::##::#....
.....##..##.....
""",
    "up": """
.....######.....
....#oooooo#....
...#oooooooo#...
...#oooooooo#...
..############..
...##########...
...##########...
...##########...
....########....
...##########...
..#:#oooooo#:#..
..#:#oooooo#:#..
...##oooooo##...
....#oooooo#....
....#::##::#....
.....##..##.....
""",
    "left": """
.....######.....
....#oooooo#....
...#oooooooo#...
..#ooooooooo#...
.############...
...#:::::####...
...#:#:::####...
...#:#::::###...
....#:::::##....
....########....
....#oooo:#.....
....#oooo:#.....
....#ooooo#.....
....#ooooo#.....
....#::##:#.....
.....##..##.....
""",
}
TOWNSFOLK = {
    "down": """
.....######.....
....########....
...##########...
...##::::::##...
..##:#::::#:##..
..##:#::::#:##..
..##::::::::##..
..###::oo::###..
...##::::::##...
....#oooooo#....
...#oooooooo#...
..#:#oooooo#:#..
..##oooooooo##..
...#oooooooo#...
....#::##::#....
.....##..##.....
""",
    "up": """
.....######.....
....########....
...##########...
...##########...
..############..
..############..
..############..
..############..
...##########...
....#oooooo#....
...#oooooooo#...
..#:#oooooo#:#..
..##oooooooo##..
...#oooooooo#...
....#::##::#....
.....##..##.....
""",
    "left": """
.....######.....
....########....
...##########...
...#:::::####...
..#:#::::#####..
..#:#::::#####..
..#::::::#####..
...#:o:::####...
....#::::###....
....#oooooo#....
...#ooooooo#....
...#:ooooo#.....
...#oooooo#.....
...#oooooo#.....
....#::##:#.....
.....##..##.....
""",
}
ELDER = {
    "down": """
.....######.....
....#::::::#....
...#::::::::#...
...#::::::::#...
..#:##::::##:#..
..#:#:#::#:#:#..
...#::::::::#...
....#::oo::#....
.....######.....
...#::::::::#...
..#::#::::#::#..
..#::#::::#::#..
..##:#:##:#:##..
...#::::::::#...
....#oo##oo#....
.....##..##.....
""",
    "up": """
.....######.....
....#::::::#....
...#::::::::#...
...#::::::::#...
..#::::::::::#..
..#::::::::::#..
...#::::::::#...
....#::::::#....
.....######.....
...#::::::::#...
..#::::::::::#..
..#::::::::::#..
..##::::::::##..
...#::::::::#...
....#oo##oo#....
.....##..##.....
""",
    "left": """
.....######.....
....#::::::#....
...#::::::::#...
..#:::::::::#...
..##:::::::::#..
..#:#::::::::#..
...#::::::::#...
....#o::::##....
.....######.....
....#:::::::#...
....#:#:::::#...
....#:#:::::#...
....##:::::##...
....#:::::::#...
....#oo#oo#.....
.....##..##.....
""",
}

LEGS_DOWN_WALK = """
...##oooooo##...
....#oooooo#....
....#::#.##.....
.....##.........
"""
LEGS_SIDE_WALK = """
....#ooooo#.....
...#::#.#:#.....
...##...##......
................
"""


def with_legs(rows, legs_text):
    legs = art(legs_text)
    return rows[:16 - len(legs)] + legs


def character_frames(char):
    """Six 16x16 frames per character: down, down-walk, up, up-walk, left, left-walk."""
    down, up, left = art(char["down"]), art(char["up"]), art(char["left"])
    return [down, with_legs(down, LEGS_DOWN_WALK), up, with_legs(up, LEGS_DOWN_WALK),
            left, with_legs(left, LEGS_SIDE_WALK)]


def sprite_tiles(frame):
    """A 16x16 frame as 4 tiles in 8x16 OBJ order: left column (top, bottom), right column."""
    return [tile_bytes(cut(frame, 0, 0)), tile_bytes(cut(frame, 0, 8)),
            tile_bytes(cut(frame, 8, 0)), tile_bytes(cut(frame, 8, 8))]


# ---------------------------------------------------------------------------------------
# Battle monsters (32x32, background tiles), drawn procedurally: a round dream creature.
# ---------------------------------------------------------------------------------------
def monster(dark_body, horns):
    size = 32
    px = [["." for _ in range(size)] for _ in range(size)]

    def inside(x, y, cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    body = "o" if dark_body else ":"
    for y in range(size):
        for x in range(size):
            if inside(x + 0.5, y + 0.5, 16, 18, 13, 11):
                px[y][x] = body
    # ears or horns
    for i in range(5):
        for dx in range(-2 + i // 2, 3 - i // 2):
            for cx in (9, 23):
                y = 9 - i if horns else 8 - i // 2
                x = cx + dx + (i if horns and cx > 16 else -i if horns else 0)
                if 0 <= x < size and 0 <= y < size:
                    px[y][x] = "o"
    # outline: any body/ear pixel next to white becomes black
    out = [row[:] for row in px]
    for y in range(size):
        for x in range(size):
            if px[y][x] != ".":
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if not (0 <= nx < size and 0 <= ny < size) or px[ny][nx] == ".":
                        out[y][x] = "#"
    # eyes, mouth, feet
    for ex in (11, 20):
        for y in range(14, 19):
            for x in range(ex - 1, ex + 2):
                out[y][x] = "#"
        out[15][ex] = "."
    for x in range(14, 19):
        out[22][x] = "#"
    out[21][13] = out[21][19] = "#"
    for fx in (8, 21):
        for x in range(fx, fx + 4):
            out[29][x] = "#"
            out[30][x] = "#"
    return ["".join(r) for r in out]


def monster_tiles(rows):
    """32x32 drawing -> 16 tiles, row-major (4 rows of 4 tiles)."""
    return [tile_bytes(cut(rows, tx * 8, ty * 8)) for ty in range(4) for tx in range(4)]


# ---------------------------------------------------------------------------------------
# Maps. One character per block; the border block fills everything outside the map.
# ---------------------------------------------------------------------------------------
MAPS = {}
MAPS[0x00] = dict(name="DREAM_TOWN", border="TREE", rows="""
TTTTTTTTT==TTTTTTTTT
T........==........T
T.RRRR...==..,,....T
T.RRRR...==........T
T.WDWW...==..RRRRR.T
T..=.....==..RRRRR.T
T..========..WWDWW.T
T...S....==....=...T
T.,,.....==....=...T
T........=======...T
T..~~~~.....S....,.T
T..~~~~............T
T..~~~~....,,......T
T.........TT.......T
T..,,.....TT...,,..T
T..................T
T..................T
TTTTTTTTTTTTTTTTTTTT
""")
MAPS[0x01] = dict(name="PLAYERS_HOUSE", border="VOID", rows="""
IIIIIIII
IB___PPI
I______I
I__tt__I
I______I
I______I
IIIMIIII
""")
MAPS[0x02] = dict(name="LAB", border="VOID", rows="""
IIIIIIIIII
IPPP__PPPI
I________I
I_tt__tt_I
I________I
I________I
I________I
IIIIMIIIII
""")
MAPS[0x03] = dict(name="ROUTE_1", border="TREE", rows='''
TTTTTTTTTTTT
T.YYYYYY...T
T.YYYYYY...T
T.WWWDWW.S.T
T....=.....T
T.,..=...,.T
T""".=.""""T
T""".=.""""T
T""".=.""""T
TTTT.=.TTTTT
T.====.....T
T.=TTTTTT..T
T.=T~~~~T""T
T.=T~~~~T""T
T.=TTTTTT""T
T.=......,.T
T.=====.TTTT
TTTTTT=.T""T
T"""..=..""T
T"""..=..""T
T"""..=....T
T.....=....T
T..,..=."""T
T.TT..=."""T
T.TT..=....T
T.....=,...T
T""...=....T
T""...=....T
T.....==...T
TTTTT==TTTTT
''')
MAPS[0x04] = dict(name="GYM", border="VOID", rows="""
IIIIIIIIII
I________I
I_o____o_I
I________I
I_o____o_I
I________I
I_o____o_I
I________I
I________I
IIIIMIIIII
""")

# Edge connections: walking off the north edge of `src` enters `dst` at its south edge.
# x on dst = x on src + offset.
NORTH = {0x00: (0x03, -4)}
SOUTH = {0x03: (0x00, 4)}

# Warps: (map, x, y) -> (dest map, x, y, facing). Facing: 0 down, 1 up, 2 left, 3 right.
WARPS = [
    (0x00, 3, 4, 0x01, 3, 5, 1),    # town: house door -> inside, above the mat
    (0x01, 3, 6, 0x00, 3, 5, 0),    # house mat -> below the house door
    (0x00, 15, 6, 0x02, 4, 6, 1),   # town: lab door
    (0x02, 4, 7, 0x00, 15, 7, 0),   # lab mat
    (0x03, 5, 3, 0x04, 4, 8, 1),    # route 1: gym door (far north end)
    (0x04, 4, 9, 0x03, 5, 4, 0),    # gym mat
]

# Things read with A: (map, x, y, kind, text). Kind 0 = text, 1 = text and heal.
SIGNS = [
    (0x00, 4, 7, 0, "DREAM TOWN\nDREAMS BEGIN HERE."),
    (0x00, 12, 10, 0, "ROUTE 1 IS NORTH.\nTHE GYM IS AT ITS\nFAR END."),
    (0x01, 1, 1, 1, "YOU TOOK A NAP.\nHP IS RESTORED!"),
    (0x01, 5, 1, 0, "A TV. IT SHOWS A\nDREAMY SHOW."),
    (0x01, 6, 1, 0, "A TV. IT SHOWS A\nDREAMY SHOW."),
    (0x02, 1, 1, 0, "A DREAM MACHINE.\nIT IS HUMMING."),
    (0x02, 8, 1, 0, "A DREAM MACHINE.\nIT IS HUMMING."),
    (0x03, 9, 3, 0, "DREAM GYM\nLEADER: MORPHEUS"),
]

# NPCs: (map, x, y, sprite, palette, wander radius (0 = stands still), kind, text).
# Sprite 1 townsfolk, 2 elder. Kind 0 = talk, 1 = gym leader (battle after the text), 2 = healer.
NPCS = [
    (0x00, 6, 15, 1, 1, 2, 0, "WILD DREAMON HIDE\nIN THE TALL GRASS\nOF ROUTE 1. PRESS\nSTART FOR YOUR HP."),
    (0x00, 16, 12, 2, 1, 2, 0, "THE GYM LEADER IS\nSTRONG. REST IN\nYOUR BED BEFORE\nYOU CHALLENGE HIM."),
    (0x02, 4, 2, 2, 0, 0, 2, "PROF: YOU LOOK\nTIRED. REST HERE.\nHP IS RESTORED!"),
    (0x02, 7, 5, 1, 0, 1, 0, "THE GYM IS AT THE\nFAR END OF ROUTE\n1, NORTH OF TOWN."),
    (0x03, 9, 20, 1, 0, 2, 0, "TALL GRASS IS FULL\nOF WILD DREAMON!"),
    (0x04, 4, 2, 2, 1, 0, 1, "I AM MORPHEUS!\nSHOW ME THE POWER\nOF YOUR DREAMS!"),
]

START = (0x00, 3, 5, 0)        # new game: below the house door, facing down
BLACKOUT = (0x01, 2, 1, 2)     # after a lost battle: next to the bed, facing left


def check_maps():
    """Fail the build if a map is ragged or a warp, sign or NPC is misplaced or unreachable."""
    for map_id, m in MAPS.items():
        rows = art(m["rows"])
        m["w"], m["h"] = len(rows[0]), len(rows)
        m["blocks"] = [BLOCK_CHARS[ch] for row in rows for ch in row]
    solid = {i for i, (_, s, _) in enumerate(BLOCKS) if s}

    def block(map_id, x, y):
        m = MAPS[map_id]
        return m["blocks"][y * m["w"] + x]

    for (src, x, y, dst, dx, dy, _) in WARPS:
        assert block(src, x, y) in (BLOCK_ID["DOOR"], BLOCK_ID["MAT"]), (src, x, y)
        assert block(dst, dx, dy) not in solid, (dst, dx, dy)
    for (m, x, y, _, _) in SIGNS:
        assert block(m, x, y) in solid, (m, x, y)
    for (m, x, y, *_rest) in NPCS:
        assert block(m, x, y) not in solid, (m, x, y)
    # every map reachable from the start, walking and taking warps and edge connections
    seen, todo = set(), deque([START[:3]])
    warp_at = {(w[0], w[1], w[2]): (w[3], w[4], w[5]) for w in WARPS}
    while todo:
        m, x, y = todo.popleft()
        if (m, x, y) in seen:
            continue
        seen.add((m, x, y))
        if (m, x, y) in warp_at:
            todo.append(warp_at[(m, x, y)])
        mp = MAPS[m]
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if ny < 0 and m in NORTH:
                dst, off = NORTH[m]
                todo.append((dst, nx + off, MAPS[dst]["h"] - 1))
            elif ny >= mp["h"] and m in SOUTH:
                dst, off = SOUTH[m]
                todo.append((dst, nx + off, 0))
            elif 0 <= nx < mp["w"] and 0 <= ny < mp["h"] and block(m, nx, ny) not in solid:
                todo.append((m, nx, ny))
    assert {m for m, _, _ in seen} == set(MAPS), sorted({m for m, _, _ in seen})
    assert (0x04, 4, 3) in seen  # the tile below the gym leader


# ---------------------------------------------------------------------------------------
# Emit C.
# ---------------------------------------------------------------------------------------
class Tiles:
    """Tile store: index 0 is blank white; background tiles are de-duplicated."""

    def __init__(self):
        self.data = [tile_bytes(["........"] * 8)]
        self.index = {self.data[0]: 0}
        self.names = {}

    def add(self, tile, dedup=True):
        if dedup and tile in self.index:
            return self.index[tile]
        self.data.append(tile)
        self.index.setdefault(tile, len(self.data) - 1)
        return len(self.data) - 1

    def align2(self):
        if len(self.data) % 2:
            self.data.append(self.data[0])


def c_bytes(values, per_line=16):
    values = list(values)
    lines = []
    for i in range(0, len(values), per_line):
        lines.append("    " + ", ".join(f"0x{v:02X}" for v in values[i:i + per_line]) + ",")
    return "\n".join(lines)


def c_string(text):
    return '"' + text.replace("\n", "\\n") + '"'


def main(outdir):
    check_maps()
    tiles = Tiles()
    defines = []

    # font: printable ASCII -> tile (0 = blank for unknown characters and space)
    font_map = [0] * 96
    for ch, glyph in GLYPHS.items():
        rows5 = glyph.split()
        rows = ["." + r.replace("#", "#") + ".." for r in rows5] + ["........"]
        font_map[ord(ch) - 32] = tiles.add(tile_bytes(rows))
    for name, text in BOX_TILES.items():
        defines.append((f"TILE_{name}", tiles.add(tile_bytes(text.split()))))
    bar0 = None
    for filled in range(9):
        idx = tiles.add(tile_bytes(bar_tile(filled)), dedup=False)
        bar0 = idx if bar0 is None else bar0
    defines.append(("TILE_BAR0", bar0))

    block_tiles = []
    for name, _, _ in BLOCKS:
        rows = BLOCK_ART[name]
        assert len(rows) == 16 and all(len(r) == 16 for r in rows), name
        block_tiles.append([tiles.add(tile_bytes(cut(rows, 0, 0))), tiles.add(tile_bytes(cut(rows, 8, 0))),
                            tiles.add(tile_bytes(cut(rows, 0, 8))), tiles.add(tile_bytes(cut(rows, 8, 8)))])

    for i, rows in enumerate((monster(False, False), monster(True, True))):
        first = None
        for t in monster_tiles(rows):
            idx = tiles.add(t, dedup=False)
            first = idx if first is None else first
        defines.append((f"TILE_MONSTER{i}", first))

    # sprites: 3 characters x 6 frames x 4 tiles, even-aligned for 8x16 mode
    tiles.align2()
    defines.append(("TILE_SPRITES", len(tiles.data)))
    for char in (PLAYER, TOWNSFOLK, ELDER):
        for frame in character_frames(char):
            for t in sprite_tiles(frame):
                tiles.add(t, dedup=False)
    assert len(tiles.data) <= 256, f"{len(tiles.data)} tiles: more than fit at 0x8000"
    defines.append(("TILE_COUNT", len(tiles.data)))

    h = ["/* Generated by assets.py: do not edit. */", "#ifndef ASSETS_H", "#define ASSETS_H", ""]
    for name, value in defines:
        h.append(f"#define {name} {value}")
    for i, (name, solid, _) in enumerate(BLOCKS):
        h.append(f"#define BLK_{name} {i}")
    h.append(f"#define NUM_BLOCKS {len(BLOCKS)}")
    h.append(f"#define NUM_MAPS {len(MAPS)}")
    for key, (m, x, y, f) in (("START", START), ("BLACKOUT", BLACKOUT)):
        h += [f"#define {key}_MAP {m}", f"#define {key}_X {x}", f"#define {key}_Y {y}", f"#define {key}_FACING {f}"]
    h += ["", "extern const unsigned char tile_data[];", "extern const unsigned char font_map[];",
          "extern const unsigned char block_tiles[][4];", "extern const unsigned char block_solid[];",
          "extern const MapDef maps[];", "", "#endif"]

    c = ["/* Generated by assets.py from the art and maps drawn there: do not edit. */",
         '#include "cart.h"', '#include "assets.h"', ""]
    c.append(f"const unsigned char tile_data[{len(tiles.data) * 16}] = {{")
    c.append(c_bytes(b for t in tiles.data for b in t))
    c.append("};")
    c.append("const unsigned char font_map[96] = {")
    c.append(c_bytes(font_map))
    c.append("};")
    c.append(f"const unsigned char block_tiles[{len(BLOCKS)}][4] = {{")
    for (name, _, _), t in zip(BLOCKS, block_tiles):
        c.append(f"    {{{t[0]}, {t[1]}, {t[2]}, {t[3]}}},  /* {name} */")
    c.append("};")
    c.append("const unsigned char block_solid[] = {" + ", ".join(str(s) for _, s, _ in BLOCKS) + "};")
    for map_id, m in sorted(MAPS.items()):
        name = m["name"].lower()
        c.append(f"static const unsigned char {name}_blocks[] = {{")
        c.append(c_bytes(m["blocks"], per_line=m["w"]))
        c.append("};")
        warps = [w for w in WARPS if w[0] == map_id]
        c.append(f"static const Warp {name}_warps[] = {{")
        c += [f"    {{{w[1]}, {w[2]}, {w[3]}, {w[4]}, {w[5]}, {w[6]}}}," for w in warps] or ["    {0}"]
        c.append("};")
        signs = [s for s in SIGNS if s[0] == map_id]
        c.append(f"static const Sign {name}_signs[] = {{")
        c += [f"    {{{s[1]}, {s[2]}, {s[3]}, {c_string(s[4])}}}," for s in signs] or ["    {0}"]
        c.append("};")
        npcs = [n for n in NPCS if n[0] == map_id]
        c.append(f"static const NpcDef {name}_npcs[] = {{")
        c += [f"    {{{n[1]}, {n[2]}, {n[3]}, {n[4]}, {n[5]}, {n[6]}, {c_string(n[7])}}}," for n in npcs] or ["    {0}"]
        c.append("};")
        m.update(nwarps=len(warps), nsigns=len(signs), nnpcs=len(npcs))
    c.append("const MapDef maps[] = {")
    for map_id, m in sorted(MAPS.items()):
        name = m["name"].lower()
        north = NORTH.get(map_id, (0xFF, 0))
        south = SOUTH.get(map_id, (0xFF, 0))
        c.append(f"    {{{name}_blocks, {m['w']}, {m['h']}, BLK_{m['border']}, {north[0]}, {north[1]}, "
                 f"{south[0]}, {south[1]}, {name}_warps, {m['nwarps']}, {name}_signs, {m['nsigns']}, "
                 f"{name}_npcs, {m['nnpcs']}}},")
    c.append("};")

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "assets.h").write_text("\n".join(h) + "\n")
    (out / "assets.c").write_text("\n".join(c) + "\n")
    print(f"assets: {len(tiles.data)} tiles, {len(BLOCKS)} blocks, {len(MAPS)} maps")


if __name__ == "__main__":
    main(sys.argv[1])
