/*
 * PokeDreamer: a small open Game Boy (DMG) game that keeps Pokemon Red's RAM layout,
 * so the same environment code can read map, position, battle and party state.
 *
 * One frame of the main loop: HALT until VBlank -> VBlank work (OAM DMA, scroll
 * registers, one streamed background block, or a full redraw with the LCD off) ->
 * read the joypad, advance the PRNG -> update the current mode (title, overworld,
 * battle transition, battle).
 */
#include "cart.h"
#include "assets.h"

/* ----- hardware registers ------------------------------------------------------------ */
#define REG(a) (*(volatile unsigned char *)(a))
#define rP1   REG(0xFF00)
#define rNR52 REG(0xFF26)
#define rLCDC REG(0xFF40)
#define rSTAT REG(0xFF41)
#define rSCY  REG(0xFF42)
#define rSCX  REG(0xFF43)
#define rLY   REG(0xFF44)
#define rBGP  REG(0xFF47)
#define rOBP0 REG(0xFF48)
#define rOBP1 REG(0xFF49)
#define rWY   REG(0xFF4A)
#define rWX   REG(0xFF4B)
#define rIF   REG(0xFF0F)
#define rIE   REG(0xFFFF)

#define BG_MAP  ((unsigned char *)0x9800)
#define WIN_MAP ((unsigned char *)0x9C00)
#define LCDC_ON 0xD7       /* LCD on, window map 9C00, tiles 8000, BG map 9800, 8x16 OBJ, OBJ on, BG on */
#define LCDC_WINDOW 0x20

#define PAD_A 0x01
#define PAD_B 0x02
#define PAD_START 0x08
#define PAD_RIGHT 0x10
#define PAD_LEFT 0x20
#define PAD_UP 0x40
#define PAD_DOWN 0x80
#define PAD_DIRS 0xF0

/* ----- RAM kept at Pokemon Red's addresses (ram_addresses.py) ------------------------ */
__at(0xC101) volatile unsigned char wMovementStatus;   /* 1 standing, 2 walking */
__at(0xC104) volatile unsigned char wSpriteYPixels;    /* player sprite screen Y */
__at(0xC106) volatile unsigned char wSpriteXPixels;    /* player sprite screen X */
__at(0xC109) volatile unsigned char wFacingDirection;  /* 0 down, 4 up, 8 left, 12 right */
__at(0xC300) volatile unsigned char shadow_oam[160];   /* copied to OAM by DMA every frame */
__at(0xCC26) volatile unsigned char wCurrentMenuItem;
__at(0xCD6B) volatile unsigned char wJoyIgnore;
__at(0xCFC5) volatile unsigned char wWalkCounter;      /* pixels left in the current step */
__at(0xCFE6) volatile unsigned char wEnemyMonHP[2];    /* big-endian */
__at(0xD015) volatile unsigned char wBattleMonHP[2];   /* big-endian */
__at(0xD057) volatile unsigned char wIsInBattle;       /* 0 none, 1 wild, 2 gym leader */
__at(0xD05A) volatile unsigned char wBattleType;
__at(0xD125) volatile unsigned char wTextBoxID;        /* 0 none, 1 message, 2 START menu */
__at(0xD163) volatile unsigned char wPartyCount;
__at(0xD164) volatile unsigned char wPartySpecies[7];
__at(0xD16C) volatile unsigned char wPartyMon1HP[2];   /* big-endian */
__at(0xD18C) volatile unsigned char wPartyMon1Level;
__at(0xD18D) volatile unsigned char wPartyMon1MaxHP[2];
__at(0xD356) volatile unsigned char wObtainedBadges;   /* bit 0: Dream Badge */
__at(0xD35E) volatile unsigned char wCurMap;
__at(0xD361) volatile unsigned char wYCoord;
__at(0xD362) volatile unsigned char wXCoord;
__at(0xD365) volatile unsigned char wLastMap;
__at(0xD368) volatile unsigned char wCurMapHeight;     /* in 16x16 blocks */
__at(0xD369) volatile unsigned char wCurMapWidth;
#define hJoyHeld REG(0xFFB4)                            /* A B SEL START R L U D = bits 0..7 (HRAM) */

/* ----- RAM of this cartridge (free area 0xD900-0xD9FF; cartridge/README.md) ----------- */
__at(0xD900) volatile unsigned int wRandom;            /* xorshift16 state, little-endian */
__at(0xD902) volatile unsigned char wGameMode;         /* 0 boot, 1 title, 2 overworld, 3 transition, 4 battle */
__at(0xD903) volatile unsigned char wFrameCounter;
__at(0xD904) volatile unsigned char wEnemyLevel;
__at(0xD905) volatile unsigned char wBattleResult;     /* 0 running, 1 won, 2 lost, 3 escaped */
__at(0xD906) volatile unsigned char wBattlesWon;

#define MODE_TITLE 1
#define MODE_OVERWORLD 2
#define MODE_TRANSITION 3
#define MODE_BATTLE 4

#define REDRAW_NONE 0
#define REDRAW_OVERWORLD 1
#define REDRAW_BATTLE 2
#define REDRAW_TITLE 3

#define STEP_FRAMES 16
#define TURN_HOLD_FRAMES 12   /* a press that turned the player walks only if held longer than this */
#define ENCOUNTER_CHANCE 26   /* out of 256: about 1 step in 10 on tall grass */
#define MAX_NPCS 4

static const signed char DIR_DX[4] = {0, 0, -1, 1};   /* down, up, left, right */
static const signed char DIR_DY[4] = {1, -1, 0, 0};

/* ----- game state ---------------------------------------------------------------------- */
typedef struct {
    signed char x, y;            /* block; the destination while moving */
    unsigned char dir, count;    /* count: pixels left in the current step */
    unsigned char timer;         /* frames until the next wander decision */
    const NpcDef *def;
} Npc;

static const MapDef *map;
static unsigned char cur_map;
static unsigned int row_offset[32];
static signed char px, py;                 /* player block; the destination while walking */
static unsigned char facing, walk_count, walk_phase, turn_hold;
static unsigned char joy, joy_prev, joy_new;
static unsigned char redraw;
static unsigned char scx, scy;
static int cam_x, cam_y;
static signed char stream_x, stream_y;     /* next background block to draw while walking */
static unsigned char stream_horizontal, stream_left;
static Npc npcs[MAX_NPCS];
static unsigned char npc_count;
static unsigned char text_after;           /* what closing the text box does */
static unsigned char level;
static unsigned int hp, max_hp, enemy_hp, enemy_max;
static unsigned char battle_state, cursor, transition_frames;
static unsigned char sprites_dirty;        /* camera or a sprite changed: rebuild OAM */
static unsigned char input_lock;           /* after a warp: ignore buttons until all are released */
static unsigned char bg_ox, bg_oy;         /* block (x, y) is drawn at background block (x + bg_ox, y + bg_oy) mod 16 */

#define AFTER_NOTHING 0
#define AFTER_LEADER_BATTLE 1

/* ----- small helpers ------------------------------------------------------------------ */
static void wait_vblank(void)
{
    __asm__("halt\n nop");
}

static unsigned char rand8(void)
{
    unsigned int r = wRandom;
    r ^= r << 7;
    r ^= r >> 9;
    r ^= r << 8;
    wRandom = r;
    return (unsigned char)(r >> 8);
}

/* Write one byte of VRAM while the LCD may be drawing: wait for HBlank or VBlank. */
static void vset(unsigned char *p, unsigned char v)
{
    while (rSTAT & 2)
        ;
    *p = v;
}

static void lcd_off(void)
{
    if (rLCDC & 0x80) {
        while (rLY < 144)
            ;
        rLCDC = 0;
    }
}

static void oam_dma(void)
{
    ((void (*)(void))0xFF80)();
}

static unsigned char font_tile(char c)
{
    if (c < 32 || c > 127)
        return 0;
    return font_map[c - 32];
}

/* Print text with '\n' line breaks; a line starts `pitch` bytes below the previous one. */
static void print_pitch(unsigned char *p, const char *s, unsigned char pitch)
{
    unsigned char *line = p;
    while (*s) {
        if (*s == '\n') {
            line += pitch;
            p = line;
        } else {
            vset(p++, font_tile(*s));
        }
        s++;
    }
}

static void print(unsigned char *p, const char *s)
{
    print_pitch(p, s, 32);
}

static void print_number(unsigned char *p, unsigned int v, unsigned char width)
{
    unsigned char digits[5], n = 0;
    do {
        digits[n++] = v % 10;
        v /= 10;
    } while (v && n < 5);
    while (width > n) {
        vset(p++, 0);
        width--;
    }
    while (n)
        vset(p++, font_tile('0' + digits[--n]));
}

static void fill(unsigned char *p, unsigned char tile, unsigned char w, unsigned char h)
{
    unsigned char x;
    for (; h; h--, p += 32)
        for (x = 0; x < w; x++)
            vset(p + x, tile);
}

static void draw_box(unsigned char *p, unsigned char w, unsigned char h)
{
    unsigned char x, y;
    for (y = 0; y < h; y++, p += 32) {
        for (x = 0; x < w; x++) {
            unsigned char t = 0;
            if (y == 0)
                t = x == 0 ? TILE_BOX_TL : x == w - 1 ? TILE_BOX_TR : TILE_BOX_T;
            else if (y == h - 1)
                t = x == 0 ? TILE_BOX_BL : x == w - 1 ? TILE_BOX_BR : TILE_BOX_B;
            else if (x == 0)
                t = TILE_BOX_L;
            else if (x == w - 1)
                t = TILE_BOX_R;
            vset(p + x, t);
        }
    }
}

/* ----- party ---------------------------------------------------------------------------- */
static void sync_party(void)
{
    wPartyMon1HP[0] = hp >> 8;
    wPartyMon1HP[1] = hp & 0xFF;
    wPartyMon1MaxHP[0] = max_hp >> 8;
    wPartyMon1MaxHP[1] = max_hp & 0xFF;
    wPartyMon1Level = level;
}

/* The party in RAM is the truth (a test or tool may write it): read it before using it. */
static void load_party(void)
{
    hp = ((unsigned int)wPartyMon1HP[0] << 8) | wPartyMon1HP[1];
    max_hp = ((unsigned int)wPartyMon1MaxHP[0] << 8) | wPartyMon1MaxHP[1];
    level = wPartyMon1Level;
    if (!level)
        level = 1;
    if (!max_hp)
        max_hp = 1;
    if (hp > max_hp)
        hp = max_hp;
}

static void heal(void)
{
    load_party();
    hp = max_hp;
    sync_party();
}

/* ----- maps ----------------------------------------------------------------------------- */
static unsigned char map_block(const MapDef *m, signed char bx, signed char by)
{
    return m->blocks[(unsigned int)(unsigned char)by * m->w + (unsigned char)bx];
}

/* The block at (bx, by), outside the map too: the connected map or the border. */
static unsigned char get_block(signed char bx, signed char by)
{
    const MapDef *m;
    if (bx >= 0 && by >= 0 && bx < (signed char)map->w && by < (signed char)map->h)
        return map->blocks[row_offset[(unsigned char)by] + (unsigned char)bx];
    if (by < 0 && map->north != 0xFF) {
        m = &maps[map->north];
        bx += map->north_off;
        by += m->h;
    } else if (by >= (signed char)map->h && map->south != 0xFF) {
        m = &maps[map->south];
        bx += map->south_off;
        by -= map->h;
    } else {
        return map->border;
    }
    if (bx >= 0 && by >= 0 && bx < (signed char)m->w && by < (signed char)m->h)
        return map_block(m, bx, by);
    return map->border;
}

static void draw_block(signed char bx, signed char by)
{
    const unsigned char *t = block_tiles[get_block(bx, by)];
    unsigned char *p = BG_MAP + ((unsigned int)((by + bg_oy) & 15) << 6) + (((bx + bg_ox) & 15) << 1);
    p[0] = t[0];
    p[1] = t[1];
    p[32] = t[2];
    p[33] = t[3];
}

/* One background row of 12 blocks: the block ids, where the row starts, the first column. */
static unsigned char row_blocks[12];
static unsigned char *row_start;
static unsigned char row_column;

/* Write the tiles of row_blocks to the background (2 tile rows, 24 tiles, wrapping at 32). */
static void draw_row(void) __naked
{
    __asm
    ld a, (#_row_column)
    ld c, a
    ld b, #12
    ld de, #_row_blocks
00001$:
    ld a, (de)
    inc de
    push de
    ld l, a
    ld h, #0
    add hl, hl
    add hl, hl
    ld de, #_block_tiles
    add hl, de              ; hl: the 4 tile ids of the block
    ld a, (#_row_start)
    add a, c
    ld e, a
    ld a, (#_row_start + 1)
    adc a, #0
    ld d, a                 ; de: top-left tile in the background map
    ld a, (hl+)
    ld (de), a
    inc de
    ld a, (hl+)
    ld (de), a
    ld a, e
    add a, #31
    ld e, a
    ld a, d
    adc a, #0
    ld d, a
    ld a, (hl+)
    ld (de), a
    inc de
    ld a, (hl)
    ld (de), a
    ld a, c
    add a, #2
    and a, #31
    ld c, a
    pop de
    dec b
    jr nz, 00001$
    ret
    __endasm;
}

/* The background holds 12x11 blocks around the player: [x-5, x+6] x [y-5, y+5].
 * Drawn with the LCD off, a row at a time. */
static void draw_around_player(void)
{
    signed char by, x0 = px - 5;
    unsigned char n, w = map->w, border = map->border;
    const unsigned char *src;
    row_column = ((x0 + bg_ox) & 15) << 1;
    for (by = py - 5; by <= py + 5; by++) {
        row_start = BG_MAP + ((unsigned int)((by + bg_oy) & 15) << 6);
        if ((unsigned char)by < map->h) {
            src = map->blocks + row_offset[(unsigned char)by];
            for (n = 0; n < 12; n++) {
                unsigned char bx = (unsigned char)(x0 + n);
                row_blocks[n] = bx < w ? src[bx] : border;
            }
        } else if ((by < 0 && map->north != 0xFF) || (by >= 0 && map->south != 0xFF)) {
            for (n = 0; n < 12; n++)
                row_blocks[n] = get_block(x0 + n, by);
        } else {
            for (n = 0; n < 12; n++)
                row_blocks[n] = border;
        }
        draw_row();
    }
}

/* Make `id` the current map with the player at (x, y); the caller redraws or keeps the background. */
static void enter_map(unsigned char id, signed char x, signed char y, unsigned char dir)
{
    unsigned char i;
    const NpcDef *def;
    wLastMap = cur_map;
    cur_map = id;
    map = &maps[id];
    for (i = 0; i < map->h; i++)
        row_offset[i] = (unsigned int)i * map->w;
    px = x;
    py = y;
    facing = dir;
    sprites_dirty = 1;
    walk_count = 0;
    turn_hold = 0;
    stream_horizontal = 0;
    stream_left = 0;
    npc_count = map->nnpcs;
    for (i = 0; i < npc_count; i++) {
        def = &map->npcs[i];
        npcs[i].x = def->x;
        npcs[i].y = def->y;
        npcs[i].dir = 0;
        npcs[i].count = 0;
        npcs[i].timer = 16 + (rand8() & 31);
        npcs[i].def = def;
    }
    wCurMap = id;
    wXCoord = x;
    wYCoord = y;
    wCurMapWidth = map->w;
    wCurMapHeight = map->h;
    wFacingDirection = dir << 2;
}

static void load_map(unsigned char id, signed char x, signed char y, unsigned char dir)
{
    enter_map(id, x, y, dir);
    redraw = REDRAW_OVERWORLD;
    input_lock = 1;
}

/* Walking off a connected edge: the background already shows the next map (get_block draws
 * across the edge), so only the origin moves: no redraw, the scrolling goes on seamlessly. */
static void cross_edge(unsigned char id, signed char dx, signed char dy)
{
    bg_ox -= dx;
    bg_oy -= dy;
    enter_map(id, px + dx, py + dy, facing);
}

/* ----- NPCs ----------------------------------------------------------------------------- */
/* Index+1 of the NPC occupying (x, y) (its tile, or the one it is leaving), else 0. */
static unsigned char npc_at(signed char x, signed char y)
{
    unsigned char i;
    Npc *n;
    for (i = 0; i < npc_count; i++) {
        n = &npcs[i];
        if (n->x == x && n->y == y)
            return i + 1;
        if (n->count && n->x - DIR_DX[n->dir] == x && n->y - DIR_DY[n->dir] == y)
            return i + 1;
    }
    return 0;
}

static unsigned char player_at(signed char x, signed char y)
{
    if (x == px && y == py)
        return 1;
    return walk_count && x == px - DIR_DX[facing] && y == py - DIR_DY[facing];
}

static void update_npcs(void)
{
    unsigned char i, d, b;
    signed char tx, ty;
    Npc *n;
    for (i = 0; i < npc_count; i++) {
        n = &npcs[i];
        if (n->count) {
            n->count--;
            sprites_dirty = 1;
            continue;
        }
        if (!n->def->wander)
            continue;
        if (n->timer) {
            n->timer--;
            continue;
        }
        n->timer = 24 + (rand8() & 63);
        d = rand8() & 3;
        n->dir = d;
        sprites_dirty = 1;
        tx = n->x + DIR_DX[d];
        ty = n->y + DIR_DY[d];
        if (tx < (signed char)(n->def->x - n->def->wander) || tx > (signed char)(n->def->x + n->def->wander) ||
            ty < (signed char)(n->def->y - n->def->wander) || ty > (signed char)(n->def->y + n->def->wander))
            continue;
        if (tx < 0 || ty < 0 || tx >= (signed char)map->w || ty >= (signed char)map->h)
            continue;
        b = get_block(tx, ty);
        if (block_solid[b] || b == BLK_DOOR || b == BLK_MAT || b == BLK_TALLGRASS)
            continue;
        if (player_at(tx, ty) || npc_at(tx, ty))
            continue;
        n->x = tx;
        n->y = ty;
        n->count = STEP_FRAMES;
    }
}

/* ----- sprites -------------------------------------------------------------------------- */
/* A 16x16 character as two 8x16 objects. OAM coordinates are screen + (16, 8). */
static void put_character(unsigned char slot, int sx, int sy, unsigned char chr, unsigned char dir,
                          unsigned char walking, unsigned char attr)
{
    volatile unsigned char *o = &shadow_oam[slot << 2];
    unsigned char frame = dir == 0 ? 0 : dir == 1 ? 2 : 4;
    unsigned char tile, flip = dir == 3;
    if (sx <= -16 || sx >= 160 || sy <= -16 || sy >= 144) {
        o[0] = 0;
        o[4] = 0;
        return;
    }
    if (walking) {
        frame++;
        if (dir < 2 && (walking & 2))
            flip = 1;
    }
    tile = TILE_SPRITES + (chr * 6 + frame) * 4;
    if (flip)
        attr |= 0x20;
    o[0] = sy + 16;
    o[1] = sx + 8;
    o[2] = flip ? tile + 2 : tile;
    o[3] = attr;
    o[4] = sy + 16;
    o[5] = sx + 16;
    o[6] = flip ? tile : tile + 2;
    o[7] = attr;
}

static void hide_sprites(void)
{
    unsigned char i;
    for (i = 0; i < 160; i += 4)
        shadow_oam[i] = 0;
}

/* d * count for d in {-1, 0, 1}, without a multiplication */
static int along(signed char d, unsigned char count)
{
    if (d > 0)
        return count;
    if (d < 0)
        return -(int)count;
    return 0;
}

static void update_camera_and_sprites(void)
{
    unsigned char i, walking;
    int sx, sy;
    Npc *n;
    if (!sprites_dirty)
        return;
    sprites_dirty = 0;
    cam_x = ((int)px << 4) - 64 - along(DIR_DX[facing], walk_count);
    cam_y = ((int)py << 4) - 64 - along(DIR_DY[facing], walk_count);
    scx = (unsigned char)(cam_x + (bg_ox << 4));
    scy = (unsigned char)(cam_y + (bg_oy << 4));
    walking = (walk_count & 8) ? 1 | (walk_phase << 1) : 0;
    put_character(0, 64, 64, 0, facing, walking, 0x00);
    for (i = 0; i < MAX_NPCS; i++) {
        if (i >= npc_count) {
            REG(0xC214 + (i << 4)) = 0;
            REG(0xC215 + (i << 4)) = 0;
            shadow_oam[(1 + i) << 3] = 0;
            shadow_oam[((1 + i) << 3) + 4] = 0;
            continue;
        }
        n = &npcs[i];
        REG(0xC214 + (i << 4)) = n->y + 4;   /* like Pokemon's wSpriteNNStateData2 MapY/MapX */
        REG(0xC215 + (i << 4)) = n->x + 4;
        sx = ((int)n->x << 4) - along(DIR_DX[n->dir], n->count) - cam_x;
        sy = ((int)n->y << 4) - along(DIR_DY[n->dir], n->count) - cam_y;
        if (wTextBoxID && sy > 80)
            sy = 200;  /* keep NPCs off the text box */
        put_character(2 + (i << 1), sx, sy, n->def->sprite, n->dir, (n->count & 8) ? 1 : 0,
                      n->def->palette ? 0x10 : 0x00);
    }
    wSpriteYPixels = 64;
    wSpriteXPixels = 64;
    wWalkCounter = walk_count;
    wMovementStatus = walk_count ? 2 : 1;
}

/* ----- text box and START menu (window layer, bottom 6 rows) ---------------------------- */
static void open_window(void)
{
    rWY = 96;
    rWX = 7;
    rLCDC = LCDC_ON | LCDC_WINDOW;
}

static void open_text(const char *s, unsigned char after)
{
    draw_box(WIN_MAP, 20, 6);
    print(WIN_MAP + 33, s);
    text_after = after;
    wTextBoxID = 1;
    sprites_dirty = 1;
    wJoyIgnore = 1;
    open_window();
}

static void open_menu(void)
{
    unsigned char *p = WIN_MAP;
    load_party();
    draw_box(p, 20, 6);
    print(p + 33, "SNOOZLE  LV");
    print_number(p + 33 + 12, level, 3);
    print(p + 65, "HP");
    print_number(p + 65 + 3, hp, 3);
    print(p + 65 + 6, "/");
    print_number(p + 65 + 7, max_hp, 3);
    print(p + 97, "BADGES");
    print_number(p + 97 + 7, (wObtainedBadges & 1), 1);
    print(p + 129, "B OR START: CLOSE");
    text_after = AFTER_NOTHING;
    wTextBoxID = 2;
    sprites_dirty = 1;
    wJoyIgnore = 1;
    open_window();
}

static void begin_battle(unsigned char kind);

static void close_text(void)
{
    rLCDC = LCDC_ON;
    wTextBoxID = 0;
    wJoyIgnore = 0;
    sprites_dirty = 1;
    if (text_after == AFTER_LEADER_BATTLE)
        begin_battle(2);
}

/* ----- overworld ------------------------------------------------------------------------ */
static void start_stream(void)
{
    /* the row or column that enters the 12x11 drawn area after this step */
    if (facing >= 2) {
        stream_horizontal = 0;
        stream_x = facing == 3 ? px + 6 : px - 5;
        stream_y = py - 5;
        stream_left = 11;
    } else {
        stream_horizontal = 1;
        stream_x = px - 5;
        stream_y = facing == 0 ? py + 5 : py - 5;
        stream_left = 12;
    }
}

static void try_step(void)
{
    unsigned char i;
    const Warp *w;
    signed char tx = px + DIR_DX[facing], ty = py + DIR_DY[facing];
    if (block_solid[get_block(tx, ty)] || npc_at(tx, ty))
        return;
    for (i = 0; i < map->nwarps; i++) {
        w = &map->warps[i];
        if ((signed char)w->x == tx && (signed char)w->y == ty) {
            /* a door or exit mat takes the player through at once: the new map shows
             * a few frames later, well inside one action */
            load_map(w->dest_map, w->dest_x, w->dest_y, w->facing);
            return;
        }
    }
    px = tx;
    py = ty;
    walk_count = STEP_FRAMES;
    walk_phase ^= 1;
    sprites_dirty = 1;
    start_stream();
}

static void step_done(void)
{
    if (py < 0 && map->north != 0xFF) {
        cross_edge(map->north, map->north_off, maps[map->north].h);
        return;
    }
    if (py >= (signed char)map->h && map->south != 0xFF) {
        cross_edge(map->south, map->south_off, -(signed char)map->h);
        return;
    }
    wXCoord = px;
    wYCoord = py;
    if (get_block(px, py) == BLK_TALLGRASS && rand8() < ENCOUNTER_CHANCE)
        begin_battle(1);
}

static void interact(void)
{
    signed char fx = px + DIR_DX[facing], fy = py + DIR_DY[facing];
    unsigned char i = npc_at(fx, fy);
    const Sign *s;
    const NpcDef *def;
    if (i) {
        Npc *n = &npcs[i - 1];
        def = n->def;
        if (!n->count)
            n->dir = facing ^ 1;  /* face the player */
        sprites_dirty = 1;
        if (def->kind == 1) {
            if (wObtainedBadges & 1)
                open_text("YOU HAVE THE DREAM\nBADGE. YOUR DREAMS\nARE STRONG!", AFTER_NOTHING);
            else
                open_text(def->text, AFTER_LEADER_BATTLE);
            return;
        }
        if (def->kind == 2)
            heal();
        open_text(def->text, AFTER_NOTHING);
        return;
    }
    for (i = 0; i < map->nsigns; i++) {
        s = &map->signs[i];
        if ((signed char)s->x == fx && (signed char)s->y == fy) {
            if (s->kind == 1)
                heal();
            open_text(s->text, AFTER_NOTHING);
            return;
        }
    }
}

static unsigned char held_direction(void)
{
    if (joy & PAD_DOWN)
        return 0;
    if (joy & PAD_UP)
        return 1;
    if (joy & PAD_LEFT)
        return 2;
    if (joy & PAD_RIGHT)
        return 3;
    return 0xFF;
}

static void overworld_input(void)
{
    unsigned char dir;
    if (input_lock) {
        if (joy)
            return;
        input_lock = 0;
    }
    if (joy_new & PAD_START) {
        open_menu();
        return;
    }
    if (joy_new & PAD_A) {
        interact();
        return;
    }
    dir = held_direction();
    if (dir == 0xFF) {
        turn_hold = 0;
        return;
    }
    if (dir != facing) {
        /* a new direction turns first; walking needs the button held on */
        facing = dir;
        sprites_dirty = 1;
        wFacingDirection = dir << 2;
        turn_hold = 1;
        return;
    }
    if (turn_hold && turn_hold <= TURN_HOLD_FRAMES) {
        turn_hold++;
        return;
    }
    turn_hold = 0;
    try_step();
}

static void overworld_update(void)
{
    if (wTextBoxID) {
        if (joy_new & (PAD_A | PAD_B) || (wTextBoxID == 2 && (joy_new & PAD_START)))
            close_text();
        if (wGameMode == MODE_OVERWORLD)
            update_camera_and_sprites();
        return;
    }
    update_npcs();
    if (walk_count) {
        walk_count--;
        sprites_dirty = 1;
        if (!walk_count)
            step_done();
    }
    if (wGameMode != MODE_OVERWORLD)
        return;
    if (!walk_count && redraw == REDRAW_NONE)
        overworld_input();
    update_camera_and_sprites();
}

/* ----- battle --------------------------------------------------------------------------- */
#define BATTLE_MENU 0
#define BATTLE_END 1
#define MSG_AT (BG_MAP + 12 * 32 + 1)   /* two lines, rows 12 and 14 */

static void draw_hp_bar(unsigned char *p, unsigned int value, unsigned int max)
{
    unsigned char i, px_left = (unsigned char)((value * 48u) / max);
    if (value && !px_left)
        px_left = 1;
    vset(p, TILE_HP_LABEL);
    vset(p + 1, TILE_BAR_L);
    for (i = 0; i < 6; i++) {
        unsigned char f = px_left >= 8 ? 8 : px_left;
        vset(p + 2 + i, TILE_BAR0 + f);
        px_left -= f;
    }
    vset(p + 8, TILE_BAR_R);
}

static void sync_battle_hp(void)
{
    wEnemyMonHP[0] = enemy_hp >> 8;
    wEnemyMonHP[1] = enemy_hp & 0xFF;
    wBattleMonHP[0] = hp >> 8;
    wBattleMonHP[1] = hp & 0xFF;
    sync_party();
}

static void draw_battle_status(void)
{
    draw_hp_bar(BG_MAP + 2 * 32 + 1, enemy_hp, enemy_max);
    draw_hp_bar(BG_MAP + 8 * 32 + 10, hp, max_hp);
    print_number(BG_MAP + 9 * 32 + 12, hp, 3);
    print_number(BG_MAP + 9 * 32 + 16, max_hp, 3);
    print_number(BG_MAP + 7 * 32 + 18, level, 0);
}

static void battle_message(const char *s)
{
    fill(MSG_AT, 0, 18, 3);
    print_pitch(MSG_AT, s, 64);
}

static void draw_menu(void)
{
    unsigned char *p = BG_MAP + 16 * 32;
    if (battle_state == BATTLE_END) {
        print(p + 2, "A: CONTINUE      ");
        vset(p + 1, 0);
        return;
    }
    print(p + 2, "FIGHT    RUN     ");
    vset(p + 1, cursor == 0 ? font_tile('>') : 0);
    vset(p + 10, cursor == 1 ? font_tile('>') : 0);
    wCurrentMenuItem = cursor;
}

static void draw_battle_screen(void)
{
    unsigned char i, j, t;
    unsigned char *p;
    fill(BG_MAP, 0, 20, 18);
    t = wIsInBattle == 2 ? TILE_MONSTER1 : TILE_MONSTER0;
    for (j = 0, p = BG_MAP + 32 + 14; j < 4; j++, p += 32)
        for (i = 0; i < 4; i++)
            vset(p + i, t++);
    print(BG_MAP + 32 + 1, wIsInBattle == 2 ? "NIGHTMARE" : "DREAMON");
    print(BG_MAP + 32 + 10, ":L");
    print_number(BG_MAP + 32 + 12, wEnemyLevel, 0);
    print(BG_MAP + 7 * 32 + 9, "SNOOZLE:L");
    print(BG_MAP + 9 * 32 + 15, "/");
    draw_box(BG_MAP + 11 * 32, 20, 7);
    draw_battle_status();
    battle_message(wIsInBattle == 2 ? "MORPHEUS SENDS\nOUT NIGHTMARE!" : "A WILD DREAMON\nAPPEARED!");
    draw_menu();
}

static void begin_battle(unsigned char kind)
{
    load_party();
    wIsInBattle = kind;
    wBattleType = 0;
    wBattleResult = 0;
    if (kind == 2) {
        wEnemyLevel = 8;
        enemy_max = 30;
    } else {
        wEnemyLevel = 2 + rand8() % 3;
        enemy_max = 12 + (rand8() & 7);
    }
    enemy_hp = enemy_max;
    sync_battle_hp();
    cursor = 0;
    battle_state = BATTLE_MENU;
    transition_frames = 12;
    wGameMode = MODE_TRANSITION;
}

static void transition_update(void)
{
    /* flash the screen, then draw the battle screen with the LCD off */
    rBGP = (transition_frames & 4) ? 0x1B : 0xE4;
    if (--transition_frames == 0) {
        rBGP = 0xE4;
        hide_sprites();
        scx = scy = 0;
        redraw = REDRAW_BATTLE;
        wGameMode = MODE_BATTLE;
    }
}

static void win_battle(void)
{
    wBattleResult = 1;
    wBattlesWon++;
    if (level < 99) {
        level++;
        max_hp += 3;
        hp += 3;
    }
    if (wIsInBattle == 2) {
        wObtainedBadges |= 1;
        battle_message("YOU WIN! YOU GOT\nTHE DREAM BADGE!");
    } else {
        battle_message("THE FOE FAINTED!\nSNOOZLE GREW!");
    }
}

static void fight(void)
{
    unsigned char damage = level + rand8() % level;
    unsigned char taken;
    char msg[40];
    if (damage >= enemy_hp) {
        enemy_hp = 0;
        win_battle();
        battle_state = BATTLE_END;
    } else {
        enemy_hp -= damage;
        taken = (wIsInBattle == 2 ? 2 : 1) + rand8() % 3;
        if (taken >= hp) {
            hp = 0;
            wBattleResult = 2;
            battle_message("SNOOZLE FAINTED!\nYOU BLACKED OUT!");
            battle_state = BATTLE_END;
        } else {
            hp -= taken;
            /* "YOU HIT FOR nn.\nFOE HIT FOR n." */
            {
                const char *a = "YOU HIT FOR ";
                const char *b = "FOE HIT FOR ";
                unsigned char k = 0;
                while (*a)
                    msg[k++] = *a++;
                if (damage >= 10)
                    msg[k++] = '0' + damage / 10;
                msg[k++] = '0' + damage % 10;
                msg[k++] = '.';
                msg[k++] = '\n';
                while (*b)
                    msg[k++] = *b++;
                msg[k++] = '0' + taken;
                msg[k++] = '.';
                msg[k] = 0;
            }
            battle_message(msg);
        }
    }
    sync_battle_hp();
    draw_battle_status();
    draw_menu();
}

static void end_battle(void)
{
    unsigned char result = wBattleResult;
    wIsInBattle = 0;
    wGameMode = MODE_OVERWORLD;
    if (result == 2) {
        heal();
        load_map(BLACKOUT_MAP, BLACKOUT_X, BLACKOUT_Y, BLACKOUT_FACING);
    } else {
        redraw = REDRAW_OVERWORLD;
    }
    sprites_dirty = 1;
    update_camera_and_sprites();
}

static void battle_update(void)
{
    if (battle_state == BATTLE_END) {
        if (joy_new & (PAD_A | PAD_B))
            end_battle();
        return;
    }
    if (joy_new & PAD_DIRS) {
        cursor ^= 1;
        draw_menu();
    } else if (joy_new & PAD_B) {
        cursor = 1;
        draw_menu();
    } else if (joy_new & PAD_A) {
        if (cursor == 0) {
            fight();
        } else if (wIsInBattle == 2) {
            battle_message("NO RUNNING FROM A\nGYM BATTLE!");
        } else {
            wBattleResult = 3;
            end_battle();
        }
    }
}

/* ----- title screen --------------------------------------------------------------------- */
static void draw_title(void)
{
    unsigned char i, j, t = TILE_MONSTER0;
    unsigned char *p;
    fill(BG_MAP, 0, 20, 18);
    print(BG_MAP + 3 * 32 + 4, "POKEDREAMER");
    for (j = 0, p = BG_MAP + 6 * 32 + 8; j < 4; j++, p += 32)
        for (i = 0; i < 4; i++)
            vset(p + i, t++);
    print(BG_MAP + 13 * 32 + 4, "PRESS START");
    print(BG_MAP + 16 * 32 + 3, "AN OPEN GAME BOY");
}

static void new_game(void)
{
    level = 5;
    max_hp = 10 + 3 * level;
    hp = max_hp;
    wPartyCount = 1;
    wPartySpecies[0] = 1;
    wPartySpecies[1] = 0xFF;
    sync_party();
    wObtainedBadges = 0;
    wIsInBattle = 0;
    wTextBoxID = 0;
    cur_map = START_MAP;
    load_map(START_MAP, START_X, START_Y, START_FACING);
    wGameMode = MODE_OVERWORLD;
    update_camera_and_sprites();
}

/* ----- frame ---------------------------------------------------------------------------- */
static void read_joypad(void)
{
    unsigned char d, b;
    rP1 = 0x20;
    d = rP1;
    d = rP1;
    rP1 = 0x10;
    b = rP1;
    b = rP1;
    b = rP1;
    rP1 = 0x30;
    joy = ((~d & 0x0F) << 4) | (~b & 0x0F);
    joy_new = joy & ~joy_prev;
    joy_prev = joy;
    hJoyHeld = joy;
}

static void vblank_work(void)
{
    if (redraw != REDRAW_NONE) {
        lcd_off();
        if (redraw == REDRAW_OVERWORLD)
            draw_around_player();
        else if (redraw == REDRAW_BATTLE)
            draw_battle_screen();
        else
            draw_title();
        redraw = REDRAW_NONE;
        stream_left = 0;
        oam_dma();
        rSCX = scx;
        rSCY = scy;
        rLCDC = LCDC_ON;
        return;
    }
    oam_dma();
    rSCX = scx;
    rSCY = scy;
    if (stream_left) {
        draw_block(stream_x, stream_y);
        if (stream_horizontal)
            stream_x++;
        else
            stream_y++;
        stream_left--;
    }
}

static const unsigned char dma_routine[10] = {
    0x3E, 0xC3,       /* ld a, 0xC3 (shadow OAM page) */
    0xE0, 0x46,       /* ldh (0x46), a */
    0x3E, 0x28,       /* ld a, 40 */
    0x3D,             /* dec a */
    0x20, 0xFD,       /* jr nz, -3 */
    0xC9,             /* ret */
};

static void init_hardware(void)
{
    unsigned int i;
    unsigned char *dst;
    const unsigned char *src;
    rNR52 = 0;  /* sound off */
    lcd_off();
    for (i = 0; i < sizeof dma_routine; i++)
        ((unsigned char *)0xFF80)[i] = dma_routine[i];
    dst = (unsigned char *)0x8000;
    src = tile_data;
    for (i = 0; i < TILE_COUNT * 16; i++)
        *dst++ = *src++;
    for (dst = (unsigned char *)0x9800; dst < (unsigned char *)0xA000; dst++)
        *dst = 0;
    for (dst = (unsigned char *)0xFE00; dst < (unsigned char *)0xFEA0; dst++)
        *dst = 0;
    rBGP = 0xE4;
    rOBP0 = 0xD0;  /* player: white, light grey, black */
    rOBP1 = 0xE0;  /* NPCs: white, dark grey, black */
    rSCX = rSCY = 0;
    rIF = 0;
    rIE = 0x01;    /* VBlank only */
}

void main(void)
{
    init_hardware();
    wRandom = 0xACE1;
    wGameMode = MODE_TITLE;
    draw_title();
    rLCDC = LCDC_ON;
    __asm__("ei");
    while (1) {
        wait_vblank();
        vblank_work();
        read_joypad();
        rand8();
        wFrameCounter++;
        switch (wGameMode) {
        case MODE_TITLE:
            if (joy_new & PAD_START)
                new_game();
            break;
        case MODE_OVERWORLD:
            overworld_update();
            break;
        case MODE_TRANSITION:
            transition_update();
            break;
        case MODE_BATTLE:
            battle_update();
            break;
        }
    }
}
