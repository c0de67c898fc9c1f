"""Where Pokémon Red/Blue keep the game state in RAM; the open cartridge keeps the same layout.

Source: the pret/pokered symbol file (vanilla US release). All addresses are bank-0 WRAM
or HRAM; multi-byte numbers (HP, max HP) are big-endian.
"""

# --- player sprite ---------------------------------------------------------------------
SPRITE_MOVEMENT_STATUS = 0xC101  # wSpritePlayerStateData1MovementStatus
SPRITE_Y_PIXELS = 0xC104         # wSpritePlayerStateData1YPixels (screen Y)
SPRITE_X_PIXELS = 0xC106         # wSpritePlayerStateData1XPixels (screen X)
FACING = 0xC109                  # wSpritePlayerStateData1FacingDirection: 0 down, 4 up, 8 left, 12 right

# --- screen and menus ------------------------------------------------------------------
TILE_MAP = 0xC3A0                # wTileMap: 20x18 screen tile buffer
TILE_MAP_SIZE = 20 * 18
CURRENT_MENU_ITEM = 0xCC26       # wCurrentMenuItem
JOY_IGNORE = 0xCD6B              # wJoyIgnore: non-zero while input is ignored
FONT_LOADED = 0xCFC4             # wFontLoaded: bit 0 set while a text box / menu font is loaded
WALK_COUNTER = 0xCFC5            # wWalkCounter: frames left in the current step
TEXT_BOX_ID = 0xD125             # wTextBoxID: id of the open text box, 0 = none (NOT 0xC4F1, a screen tile)

# --- battle ----------------------------------------------------------------------------
ENEMY_MON_HP = 0xCFE6            # wEnemyMonHP, 2 bytes
BATTLE_MON_HP = 0xD015           # wBattleMonHP, 2 bytes
IS_IN_BATTLE = 0xD057            # wIsInBattle: 0 none, 1 wild, 2 trainer, 0xFF lost
BATTLE_TYPE = 0xD05A             # wBattleType

# --- party -----------------------------------------------------------------------------
PARTY_COUNT = 0xD163             # wPartyCount: 0..6
PARTY_SPECIES = 0xD164           # wPartySpecies: 6 bytes + 0xFF terminator
PARTY_MON_STRUCT_SIZE = 0x2C     # 44 bytes per party mon
PARTY_MON1 = 0xD16B              # wPartyMon1
PARTY_HP = tuple(0xD16C + i * PARTY_MON_STRUCT_SIZE for i in range(6))      # D16C D198 D1C4 D1F0 D21C D248
PARTY_LEVEL = tuple(0xD18C + i * PARTY_MON_STRUCT_SIZE for i in range(6))   # D18C D1B8 D1E4 D210 D23C D268
PARTY_MAX_HP = tuple(0xD18D + i * PARTY_MON_STRUCT_SIZE for i in range(6))  # D18D D1B9 D1E5 D211 D23D D269

# --- progress --------------------------------------------------------------------------
POKEDEX_OWNED = 0xD2F7           # wPokedexOwned: 19-byte bitfield
POKEDEX_SEEN = 0xD30A            # wPokedexSeen: 19-byte bitfield
POKEDEX_BYTES = 19
NUM_BAG_ITEMS = 0xD31D           # wNumBagItems
PLAYER_MONEY = 0xD347            # wPlayerMoney: 3 bytes BCD
OBTAINED_BADGES = 0xD356         # wObtainedBadges: bit 0 Boulder ... bit 7 Earth

# --- map and position ------------------------------------------------------------------
CUR_MAP = 0xD35E                 # wCurMap
Y_COORD = 0xD361                 # wYCoord: player tile Y on the current map
X_COORD = 0xD362                 # wXCoord: player tile X on the current map
LAST_MAP = 0xD365                # wLastMap
CUR_MAP_TILESET = 0xD367         # wCurMapTileset
CUR_MAP_HEIGHT = 0xD368          # wCurMapHeight, in 32x32 blocks
CUR_MAP_WIDTH = 0xD369           # wCurMapWidth, in 32x32 blocks
PLAYER_MOVING_DIRECTION = 0xD528 # wPlayerMovingDirection
PLAYER_DIRECTION = 0xD52A        # wPlayerDirection
WALK_BIKE_SURF_STATE = 0xD700    # wWalkBikeSurfState
EVENT_FLAGS_START = 0xD747       # wEventFlags .. 0xD886
EVENT_FLAGS_END = 0xD886
GRASS_RATE = 0xD887              # wGrassRate
JOY_HELD = 0xFFB4                # hJoyHeld (HRAM)

FACING_NAMES = {0: "down", 4: "up", 8: "left", 12: "right"}

# Pokémon Red/Blue map ids -> names (the ones the project meets; pret/pokered map constants).
POKERED_MAP_NAMES = {
    0x00: "Pallet Town",
    0x01: "Viridian City",
    0x02: "Pewter City",
    0x0C: "Route 1",
    0x0D: "Route 2",
    0x21: "Route 22",
    0x25: "Red's House 1F",
    0x26: "Red's House 2F",
    0x27: "Blue's House",
    0x28: "Oak's Lab",
    0x29: "Viridian Pokecenter",
    0x2A: "Viridian Mart",
    0x2D: "Viridian Gym",
    0x33: "Viridian Forest",
    0x36: "Pewter Gym",
}

# The open cartridge's maps (cartridge/README.md describes them).
CARTRIDGE_MAP_NAMES = {
    0x00: "Dream Town",
    0x01: "Player's House",
    0x02: "Lab",
    0x03: "Route 1",
    0x04: "Gym",
}
