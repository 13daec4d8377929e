"""iCEBreaker: Lattice iCE40 UP5K (5280 LCs, 8 SB_MAC16, 30 EBR, 4 SPRAM), 12 MHz oscillator, FT2232H UART.

Yosys uses the SB_MAC16 DSPs only when asked (``-dsp``), and puts a memory in SPRAM only when its zero
initialiser is deleted (Amaranth always emits one). Not yet buildable: the DSP blocks and block RAMs of
both sizes fit, but the 4x4 design packs into ~9,500 logic cells of the UP5K's 5,280 (README, Bitstreams).
"""

from amaranth_boards.icebreaker import ICEBreakerPlatform

from hw.isa import AcceleratorConfig

from .board import Board

BOARD = Board(
    name="icebreaker",
    platform=ICEBreakerPlatform,
    family="ice40",
    clock_hz=12e6,
    baud=1_000_000,
    sizes={
        # the 8 SB_MAC16 make the array's 16 products, two a block (hw.mac.ProductPair); the requantizer
        # (one column at a time) and the sequencer multiply digit-serially in logic; a pool bank is one
        # memory (two EBR at 256 words)
        "small": AcceleratorConfig(lanes=4, banks=3, bank_words=256, acc_depth=64, requant_lanes=1,
                                   serial_mul_bits=1, pool_subbanks=1, overlap=False, compact_array=True),
        # the same with the block RAM it leaves: 3 x 512 pool words (12 EBR), M up to 128 (26 of 30 EBR)
        "target": AcceleratorConfig(lanes=4, banks=3, bank_words=512, acc_depth=128, requant_lanes=1,
                                    serial_mul_bits=1, pool_subbanks=1, overlap=False, compact_array=True),
    },
    leds=2,                 # the two on the board itself (the others are on the snap-off PMOD)
    # no -dsp: every multiply is either an explicit SB_MAC16 or digit-serial logic. (Yosys 0.70's DSP
    # inference miscompiled the PEs — a 17-bit signed sum zero-extended — and its ice40_dsp pass rewrites
    # any SB_MAC16 it finds, an instantiated 8 x 8 one included, as a 16 x 16 multiply-add.)
    synth_opts="",
    programmer=("iceprog",),
)
