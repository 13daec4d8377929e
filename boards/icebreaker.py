"""iCEBreaker: Lattice iCE40 UP5K (5280 LCs, 8 SB_MAC16, 30 EBR, 4 SPRAM), 12 MHz oscillator, FT2232H UART.

The UP5K's limit is its logic cells, so this board gets the small-FPGA variant of every block (see
:class:`ambert.hw.config.Implementation`): the array's compact layout (two PEs' products in each of the 8 SB_MAC16, a
block RAM of weights a row, activations broadcast, narrow partial sums), the bit-serial requantizer with
its parameters in block RAM, the sequencer one command at a time and its multiplies bit-serial, one
memory a pool bank. It fills 92% of the logic cells and all 30 block RAMs, so there is one size. At 30 MHz
the paths that would run through several counters, compares and carry chains in a cycle are registered a
cycle ahead (the link's ACK and word bookkeeping, the engine's loader and feeder decisions).
"""

from amaranth_boards.icebreaker import ICEBreakerPlatform

from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.proto.isa import DeviceShape

from .board import Board, Size

# 4 x 4 (the 8 SB_MAC16 make its 16 products), 3 banks of 256 words (a bank is one memory: two EBR), M up
# to 64 (the accumulators: 8 EBR); the 4 rows of weights take 8 EBR, the link's buffers 4, the parameters 2
# and a delay line 2: 30 of 30
_UP5K = AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=256, acc_depth=64),
                          Implementation(requant_lanes=1, serial_mul_bits=1, pool_subbanks=1, overlap=False,
                                         compact_array=True))

BOARD = Board(
    name="icebreaker",
    platform=ICEBreakerPlatform,
    family="ice40",
    clock_hz=30e6,          # from the 12 MHz oscillator through the SB_PLL40 (12 / 1 * 80 / 32)
    baud=3_000_000,         # the FT2232H's UART takes 3 Mbaud; 10 clock cycles a bit
    sizes=(Size("small", _UP5K), Size("target", _UP5K)),
    leds=2,                 # the two on the board itself (the others are on the snap-off PMOD)
    # no -dsp: every multiply is either an explicit SB_MAC16 or digit-serial logic. (Yosys 0.70's DSP
    # inference miscompiled the PEs — a 17-bit signed sum zero-extended — and its ice40_dsp pass rewrites
    # any SB_MAC16 it finds, an instantiated 8 x 8 one included, as a 16 x 16 multiply-add.)
    synth_opts="",
    programmer=("iceprog",),
)
