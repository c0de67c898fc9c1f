/* Types shared by the game code (main.c) and the generated tables (build/assets.c). */
#ifndef CART_H
#define CART_H

typedef struct {
    unsigned char x, y;               /* warp tile on this map */
    unsigned char dest_map, dest_x, dest_y, facing;
} Warp;

typedef struct {
    unsigned char x, y, kind;         /* kind 0: text, 1: text and heal */
    const char *text;
} Sign;

typedef struct {
    unsigned char x, y, sprite, palette;
    unsigned char wander;             /* 0: stands still, else wanders this many blocks from home */
    unsigned char kind;               /* 0: talk, 1: gym leader, 2: healer */
    const char *text;
} NpcDef;

typedef struct {
    const unsigned char *blocks;
    unsigned char w, h, border;
    unsigned char north; signed char north_off;   /* 0xFF: no connection */
    unsigned char south; signed char south_off;
    const Warp *warps; unsigned char nwarps;
    const Sign *signs; unsigned char nsigns;
    const NpcDef *npcs; unsigned char nnpcs;
} MapDef;

#endif
