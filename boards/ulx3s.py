"""ULX3S 85F: Lattice ECP5 LFE5U-85F (156 MULT18X18D, 208 DP16KD, 84k LUT4), 25 MHz oscillator, FT231X UART.

The accelerator's clock comes from the oscillator through the EHXPLLL: 60 MHz, the target's 100 MHz.
The UART is the FT231X's (the USB port marked US1), at 3 Mbaud: 20 clock cycles a bit at 60 MHz, 33 1/3
at 100 (bits of 33 or 34 cycles, each edge within a cycle of where it belongs: :mod:`hw.uart`).
"""

from amaranth_boards.ulx3s import ULX3S_85F_Platform

from hw.isa import AcceleratorConfig

from .board import Board

BOARD = Board(
    name="ulx3s",
    platform=ULX3S_85F_Platform,
    family="ecp5",
    clock_hz=60e6,          # from the 25 MHz oscillator through the EHXPLLL (25 / 5 * 12)
    # the target's own: 100 MHz (25 * 4), 144 MACs a cycle = 28.8 GOPS
    size_clock_hz={"target": 100e6},
    # (seed 3: 103.3 MHz; seeds 1, 2 and 4: 100.2, 100.4 and 99.05. A build is deterministic for a seed, and
    # which few paths come last moves with it: the margin is the seed's, not the design's)
    size_seed={"target": 3},
    baud=3_000_000,         # the FT231X's fastest; 20 clock cycles a bit (33 1/3 at 100 MHz)
    sizes={
        # the smallest array, with banks deep enough for MiniLM's FFN (K = 1536 needs 1545 words)
        # (its PEs' multiplies with the DSP blocks' own registers, its pool one memory a bank of block
        # RAMs with their own output registers, read latency 5, as the target's: what the CI's
        # post-synthesis simulation checks)
        # (and, as one memory a bank takes an output row a word a cycle, the requantizer a lane a cycle)
        "small": AcceleratorConfig(lanes=4, banks=4, bank_words=2048, acc_depth=128, requant_lanes=1,
                                   product_latency=2, hop_latency=2, pool_subbanks=1, pool_read_latency=5),
        # 64 MACs a cycle: the largest array whose PEs and requantizer products both fit the 156 DSP blocks;
        # the pool's block RAM outputs registered (their 5.8 ns clock-to-out and the bank multiplexers
        # were its critical path)
        "medium": AcceleratorConfig(lanes=8, banks=4, bank_words=4096, acc_depth=512, pool_read_latency=2),
        # the target, 12x12 = 144 MACs a cycle: the PEs take 144 DSP blocks, so the requantizer takes two
        # columns a cycle (2 x 4 blocks; the last k-tile of each n-tile then issues a row every 6 cycles).
        # Its pool's block RAMs and its array's DSP strips span the chip: each pool bank is one memory
        # (one 96-bit write port, not four: an output row is written a word a cycle, inside those 6) of
        # 2048 words (MiniLM's K = 1536 still whole; at 4096 each bank is 22 block RAMs and nextpnr's
        # static placer stalled with a bank's overlapping in four of six runs), its reads and writes
        # registered in front of it, each block RAM's word in its own output register and then in the
        # fabric beside it, each reader's word after its bank multiplexer too (read latency 5: a word
        # crosses the die in three cycles; the engine then registers its accumulator memories' output
        # and its output writes too); the array's weight writes registered twice, the second time a
        # column, each multiply wholly inside its DSP block (operands and product in its registers, the
        # requantizer's too), and a register between neighbouring columns on each activation's way (27
        # tiles apart on a strip)
        "target": AcceleratorConfig(lanes=12, banks=4, bank_words=2048, acc_depth=512, requant_lanes=2,
                                    pool_subbanks=1, pool_read_latency=5, weight_write_latency=2,
                                    product_latency=2, hop_latency=2),
    },
    dsp_layout=("target",),
    programmer=("openFPGALoader", "--board", "ulx3s"),
)
