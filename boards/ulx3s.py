"""ULX3S 85F: Lattice ECP5 LFE5U-85F (156 MULT18X18D, 208 DP16KD, 84k LUT4), 25 MHz oscillator, FT231X UART.

The accelerator's clock comes from the oscillator through the EHXPLLL: 60 MHz, the target's 100 MHz.
The UART is the FT231X's (the USB port marked US1), at 3 Mbaud: 20 clock cycles a bit at 60 MHz, 33 1/3
at 100 (bits of 33 or 34 cycles, each edge within a cycle of where it belongs: :mod:`ambert.hw.uart`).
"""

from amaranth_boards.ulx3s import ULX3S_85F_Platform

from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.proto.isa import DeviceShape

from .board import Board, Size

BOARD = Board(
    name="ulx3s",
    platform=ULX3S_85F_Platform,
    family="ecp5",
    clock_hz=60e6,          # from the 25 MHz oscillator through the EHXPLLL (25 / 5 * 12)
    baud=3_000_000,         # the FT231X's fastest; 20 clock cycles a bit (33 1/3 at 100 MHz)
    sizes=(
        # the smallest array, with banks deep enough for MiniLM's FFN (K = 1536 needs 1545 words); its
        # PEs' multiplies in the DSP blocks' own registers and its pool built as the target's (one memory
        # a bank, block RAMs with their own output registers, read latency 5), so that CI's
        # post-synthesis simulation covers the target's memories; one memory a bank takes an output row
        # a word a cycle, so the requantizer takes a lane a cycle
        Size("small", AcceleratorConfig(
            DeviceShape(lanes=4, banks=4, bank_words=2048, acc_depth=128),
            Implementation(requant_lanes=1, product_latency=2, hop_latency=2, pool_subbanks=1,
                           pool_read_latency=5))),
        # 64 MACs a cycle: the largest array whose PEs and requantizer products both fit the 156 DSP
        # blocks; its block RAMs' outputs registered before the bank multiplexers
        Size("medium", AcceleratorConfig(
            DeviceShape(lanes=8, banks=4, bank_words=4096, acc_depth=512),
            Implementation(pool_read_latency=2))),
        # 12 x 12 = 144 MACs a cycle, 28.8 GOPS at 100 MHz (25 * 4). The PEs take 144 DSP blocks, so the
        # requantizer takes two columns a cycle (2 x 4 blocks). Its pool's block RAMs and its array's DSP
        # strips span the chip, so every signal that crosses it has a register at each end: each pool
        # bank one memory of 2048 words (MiniLM's K = 1536 whole) whose word crosses the die in three
        # cycles (read latency 5), the weight writes registered twice, each multiply inside its DSP
        # block's registers, a register between neighbouring array columns (docs/timing.md)
        Size("target", AcceleratorConfig(
            DeviceShape(lanes=12, banks=4, bank_words=2048, acc_depth=512),
            Implementation(requant_lanes=2, pool_subbanks=1, pool_read_latency=5, weight_write_latency=2,
                           product_latency=2, hop_latency=2)),
             clock_hz=100e6, seed=4, dsp_layout=True),
    ),
    programmer=("openFPGALoader", "--board", "ulx3s"),
)
