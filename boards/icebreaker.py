"""iCEBreaker: Lattice iCE40 UP5K (5280 LCs, 8 SB_MAC16, 30 EBR, 4 SPRAM), 12 MHz oscillator, FT2232H UART.

Yosys uses the SB_MAC16 DSPs only when asked (``-dsp``), and puts a memory in SPRAM only when its zero
initialiser is deleted (Amaranth always emits one).
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
        # one requantizer column a cycle: its 32x31 product takes 4 of the 8 SB_MAC16 (full width: 16)
        "small": AcceleratorConfig(lanes=4, banks=3, bank_words=256, acc_depth=64, requant_lanes=1),
        "target": AcceleratorConfig(lanes=4, banks=4, bank_words=4096, acc_depth=128, requant_lanes=1),
    },
    leds=2,                 # the two on the board itself (the others are on the snap-off PMOD)
    synth_opts="-dsp",
    programmer=("iceprog",),
)
