; Start-up code for the PokeDreamer cartridge (SDCC sm83 assembler, sdasgb).
; Interrupt vectors, the jump from the cartridge entry point 0x100, RAM clearing,
; copying of initialised data, then main(). The header 0x104-0x14F is written by makebin.

	.module crt0
	.globl _main
	.globl l__INITIALIZER, s__INITIALIZER, s__INITIALIZED

	.area _HEADER (ABS)

	; only VBlank is enabled (IE = 1); the handler just returns so HALT wakes up
	.org 0x40
	reti
	.org 0x48
	reti
	.org 0x50
	reti
	.org 0x58
	reti
	.org 0x60
	reti

	.org 0x100
	nop
	jp init

	.org 0x150
init:
	di
	ld sp, #0xE000          ; stack grows down from 0xDFFF, above every fixed address
	; clear work RAM 0xC000-0xDFFF
	ld hl, #0xC000
	ld bc, #0x2000
1$:	xor a
	ld (hl+), a
	dec bc
	ld a, b
	or c
	jr nz, 1$
	; clear high RAM 0xFF80-0xFFFE
	ld hl, #0xFF80
	ld c, #0x7F
	xor a
2$:	ld (hl+), a
	dec c
	jr nz, 2$
	; copy initialised globals from ROM to RAM
	ld de, #s__INITIALIZER
	ld hl, #s__INITIALIZED
	ld bc, #l__INITIALIZER
3$:	ld a, b
	or c
	jr z, 4$
	ld a, (de)
	inc de
	ld (hl+), a
	dec bc
	jr 3$
4$:	call _main
5$:	halt
	nop
	jr 5$

	; the order of areas: ROM ones first, then RAM ones
	.area _HOME
	.area _CODE
	.area _INITIALIZER
	.area _GSINIT
	.area _GSFINAL
	.area _LIT
	.area _DATA
	.area _INITIALIZED
	.area _BSS
	.area _HEAP
