"""What the hardware generator takes: the device's shape (:class:`ambert.proto.isa.DeviceShape`, what
the host compiles for) and the implementation knobs (:class:`Implementation`, which trade area and
clock for cycles and change no result). Each is validated once, here; the blocks take them whole."""

from dataclasses import dataclass, field

from ambert.proto.isa import DeviceShape

__all__ = ["Implementation", "AcceleratorConfig"]


@dataclass(frozen=True)
class Implementation:
    """How the accelerator is built; no result depends on any of these, only cycles, area and clock.

    ``requant_lanes`` (a divisor of ``lanes``; None: all): output columns the requantizer takes a
    cycle. Fewer save multipliers; the last k-tile of each n-tile then issues one row every
    ``lanes // requant_lanes`` cycles.

    ``serial_mul_bits`` (1, 4, 8 or 16; None: off): the multiplies outside the array — the
    requantizer's 32 x 31 and the sequencer's 16 x 16 — digit-serial in logic, that many multiplier bits
    a cycle, for an FPGA whose DSP blocks all go to the array (a requantized row then takes
    ``ceil(31 / serial_mul_bits)`` times as long). 1 is the smallest epilogue,
    :class:`ambert.hw.requant.BitSerialRequantizer`: one lane at a time (``requant_lanes=1``), 68 cycles
    a lane, its parameters in a block RAM.

    ``pool_subbanks`` (4 or 1): memories a pool bank interleaves. 4 writes an output row of up to four
    words in one cycle; 1 saves block RAM and writes a word a cycle, so it needs a requantizer that takes
    at least 4 cycles a row.

    ``overlap`` (default True): the sequencer runs a LOAD or STORE alongside a MATMUL, interlocked by
    bank and range; False runs one command at a time (less logic; behind a slow link the overlap saves
    little).

    ``compact_array`` (default False): the systolic array's small-FPGA layout
    (``SystolicArray(paired=True)``: two PEs' products in one iCE40 DSP block, activations broadcast
    along rows, narrow partial sums).

    ``pool_read_latency`` (1 to 5): cycles from a pool read to its data. 2 registers each memory's
    output before the sub-bank and bank multiplexers (a block RAM whose clock-to-out leaves no time for
    them: an ECP5's DP16KD, 5.8 ns); 3 also each bank's read address and write (block RAMs spread over a
    large chip); 4 also each reader's word after the bank multiplexer, so a word crosses such a chip in
    two cycles (the engine then registers its accumulator memories' output and its output writes too);
    5 also each memory's word in the fabric after the block RAM's own output register
    (:mod:`ambert.hw.bufpool`), three cycles from block RAM to reader. Each cycle more makes a MATMUL a
    cycle longer to start and to drain.

    ``weight_write_latency`` (0 to 2): 1 registers the weight writes once an array column, beside its
    PEs, instead of fanning out from one place to every PE; 2 once more before that, each row's enable
    decoded. A tile's weights land a cycle or two later.

    ``product_latency`` (1 or 2): 2 registers each PE's operands before its multiply too (on an ECP5,
    the DSP block's own input and output registers) and the requantizer's partial products; each row
    takes a cycle longer through the array and the requantizer.

    ``hop_latency`` (1 or 2): cycles an activation takes from one array column to the next (2: a
    register between them, for columns far apart on the chip); each row takes ``lanes`` cycles longer.
    """
    requant_lanes: int | None = None
    serial_mul_bits: int | None = None
    pool_subbanks: int = 4
    overlap: bool = True
    compact_array: bool = False
    pool_read_latency: int = 1
    weight_write_latency: int = 0
    product_latency: int = 1
    hop_latency: int = 1

    @property
    def pool_memory_latency(self):
        """The :class:`ambert.hw.bufpool.BufferPool`'s own read latency: all of ``pool_read_latency`` but
        the register after each reader's bank multiplexer that 4 and 5 add (:class:`ambert.hw.top.Accelerator`)."""
        return self.pool_read_latency - (self.pool_read_latency >= 4)

    def __post_init__(self):
        if self.requant_lanes is not None and (not isinstance(self.requant_lanes, int) or self.requant_lanes < 1):
            raise ValueError(f"requant_lanes must be a positive number of lanes or None, not {self.requant_lanes!r}")
        for name in ("overlap", "compact_array"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.pool_read_latency not in (1, 2, 3, 4, 5):
            raise ValueError(f"pool_read_latency must be 1 to 5, not {self.pool_read_latency!r}")
        if self.weight_write_latency not in (0, 1, 2):
            raise ValueError(f"weight_write_latency must be 0, 1 or 2, not {self.weight_write_latency!r}")
        if self.weight_write_latency and self.compact_array:
            raise ValueError("weight_write_latency applies to the full array: the compact array keeps its "
                             "weights in a block RAM a row (compact_array=True needs weight_write_latency=0)")
        if self.product_latency not in (1, 2):
            raise ValueError(f"product_latency must be 1 or 2, not {self.product_latency!r}")
        if self.product_latency != 1 and self.compact_array:
            raise ValueError("the compact array's products are registered once, in its DSP blocks "
                             "(compact_array=True needs product_latency=1)")
        if self.hop_latency not in (1, 2):
            raise ValueError(f"hop_latency must be 1 or 2, not {self.hop_latency!r}")
        if self.hop_latency != 1 and self.compact_array:
            raise ValueError("hop_latency applies to the full array: the compact array broadcasts each row's "
                             "activation (compact_array=True needs hop_latency=1)")
        if self.pool_subbanks not in (1, 4):
            raise ValueError(f"pool_subbanks must be 1 or 4, not {self.pool_subbanks!r}")
        if self.serial_mul_bits not in (None, 1, 4, 8, 16):
            raise ValueError(f"serial_mul_bits must be 1, 4, 8, 16 or None, not {self.serial_mul_bits!r}")
        if self.serial_mul_bits == 1 and self.requant_lanes != 1:
            raise ValueError(f"serial_mul_bits=1 (the bit-serial requantizer, one lane at a time) needs "
                             f"requant_lanes=1, not {self.requant_lanes!r}")


@dataclass(frozen=True)
class AcceleratorConfig:
    """One accelerator to generate: its ``shape`` (what the host sees) and its ``impl`` (how it is built).
    Checks what the two constrain together."""
    shape: DeviceShape = field(default_factory=DeviceShape)
    impl: Implementation = field(default_factory=Implementation)

    def __post_init__(self):
        if not isinstance(self.shape, DeviceShape):
            raise TypeError(f"shape must be a DeviceShape, not {self.shape!r}")
        if not isinstance(self.impl, Implementation):
            raise TypeError(f"impl must be an Implementation, not {self.impl!r}")
        lanes = self.shape.lanes
        if self.impl.requant_lanes is not None and lanes % self.impl.requant_lanes:
            raise ValueError(f"requant_lanes must divide lanes ({lanes}), not {self.impl.requant_lanes!r}")

    def __str__(self):
        return str(self.shape)
