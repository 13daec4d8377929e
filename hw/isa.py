"""The instruction set and payload layouts: the one contract between the hardware and the host.

The host talks to the accelerator over a stream of 32-bit words; the accelerator answers on a stream of
32-bit words. Every instruction starts with a header word::

    [31:24] opcode    [23:16] flags (mode for MATMUL)    [15:0] count (LOAD/STORE)

and is followed by a fixed number of argument words, and for LOAD by its data. All-zero words are NOPs,
so a run of zeros flushes any half-received command. See docs/isa.md.

Pool words are ``lanes`` bytes wide; the host carries each one as ``lanes // 4`` little-endian 32-bit
words (lane 0 in the low byte of the first word).
"""

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["ISA_VERSION", "Opcode", "Mode", "Error", "STATUS_MAGIC", "ARG_WORDS", "MODE_WORDS", "MODE_BITS",
           "PARAM_WORDS_PER_LANE_GROUP", "AcceleratorConfig", "Program"]

ISA_VERSION = 2      # 2: MATMUL and STORE run in the background, interlocked by bank
STATUS_MAGIC = 0xA5
MAX_COUNT = (1 << 16) - 1


class Opcode(enum.IntEnum):
    NOP = 0x00
    LOAD = 0x01        # + address; + count pool words of data
    STORE = 0x02       # + address; answers count pool words
    MATMUL = 0x03      # + 6 words (see MatmulArgs); flags = Mode
    SYNC = 0x04        # answers one status word, then clears the error flags
    COUNTERS = 0x05    # answers 6 words: busy, stalled, MACs (each 64-bit, low word first)
    INFO = 0x06        # answers 3 words: version/shape, pool words per bank, accumulator depth


ARG_WORDS = {Opcode.NOP: 0, Opcode.LOAD: 1, Opcode.STORE: 1, Opcode.MATMUL: 6, Opcode.SYNC: 0,
             Opcode.COUNTERS: 0, Opcode.INFO: 0}


class Mode(enum.IntEnum):
    """MATMUL output: requantized int8, requantized int16, or the int32 accumulator plus bias (bypass)."""
    INT8 = 0
    INT16 = 1
    INT32 = 2


MODE_WORDS = {Mode.INT8: 1, Mode.INT16: 2, Mode.INT32: 4}   # pool words per output row
MODE_BITS = {Mode.INT8: 8, Mode.INT16: 16, Mode.INT32: None}   # saturation width; None: no requant


class Error(enum.IntFlag):
    """Sticky error flags, reported (and cleared) by SYNC."""
    OPCODE = 1 << 0     # unknown opcode: the header word is dropped
    ADDRESS = 1 << 1    # LOAD/STORE/MATMUL range outside the pool, misaligned, or overlapping
    SHAPE = 1 << 2      # MATMUL shape the array cannot take (M, tile counts, mode)
    BANK = 1 << 3       # MATMUL operands sharing a bank they cannot share


# Requant parameters per n-tile, in pool words: bias (int32 per lane, 4 words), m0 (uint32 per lane,
# 4 words), shift (uint8 per lane, 1 word).
PARAM_WORDS_PER_LANE_GROUP = 9


@dataclass(frozen=True)
class AcceleratorConfig:
    """Hardware parameters; the runtime reads these (and nothing copied) to compile for a device.

    ``lanes`` is the array's rows and columns (square), a multiple of 4 from 4 to 32. The pool has
    ``banks`` banks of ``bank_words`` pool words each (a multiple of 4: each bank is four interleaved
    memories so an output row of up to four words is written in one cycle). ``acc_depth`` bounds M.
    ``requant_lanes`` (a divisor of ``lanes``; None: all) is how many output columns the requantizer
    takes a cycle: fewer save multipliers on a small FPGA, and the last k-tile of each n-tile then issues
    one row every ``lanes // requant_lanes`` cycles. ``serial_mul_bits`` (1, 4, 8 or 16; None: off) makes
    the multiplies outside the array — the requantizer's 32 x 31 and the sequencer's 16 x 16 — digit-
    serial in logic, that many multiplier bits a cycle, for an FPGA whose DSP blocks all go to the array
    (a requantized row then takes ``ceil(31 / serial_mul_bits)`` times as long). 1 is the smallest
    epilogue, :class:`hw.requant.BitSerialRequantizer`: one lane at a time (``requant_lanes=1``), 68
    cycles a lane, its parameters in a block RAM. Results depend on
    neither; the host never needs them. ``pool_subbanks`` (4 or 1): memories a bank interleaves; 1
    saves block RAM (a bank is one memory) and writes an output row a word a cycle, so it needs a
    requantizer that takes at least 4 cycles a row. ``overlap`` (default True): the sequencer runs a
    LOAD or STORE alongside a MATMUL (interlocked by bank and range); False runs one command at a time,
    for an FPGA short of logic behind a slow link, where the overlap would save little.
    ``compact_array`` (default False): the systolic array's small-FPGA layout (``SystolicArray(paired=True)``:
    two PEs' products in one iCE40 DSP block, activations broadcast along rows, narrow partial sums).
    ``pool_read_latency`` (1 to 5; default 1): cycles from a pool read to its data. 2 registers each
    memory's output before the sub-bank and bank multiplexers, for an FPGA whose block RAMs' clock-to-out
    leaves no time for them (an ECP5's DP16KD: 5.8 ns); 3 also registers each bank's read address and its
    write, for a pool whose block RAMs spread across a large chip; 4 also each reader's word after the bank
    multiplexer, so that the word crosses such a chip in two cycles, the multiplexer between them (and
    the engine registers its accumulator memories' output and its output writes too); 5 also each
    memory's word in the fabric after its output register (an ECP5's block RAM's own: ``hw.bufpool``),
    so that the word takes three cycles from the block RAM to its reader. Each cycle more
    makes a MATMUL a cycle longer to start and to drain. ``weight_write_latency`` (0 to 2; default 0): 1
    registers the weight writes once an array column, beside its PEs, instead of fanning them out from
    one place to every PE; 2 once more before that, each row's enable decoded; a tile's weights then land
    a cycle or two later. ``product_latency`` (1 or 2; default 1): 2 registers each
    PE's operands before its multiply as well (on an ECP5, the DSP block's own input and output registers:
    the multiply leaves the fabric's paths), and the requantizer's partial products' too, for a large
    array whose neighbouring columns are far apart on the chip; each row then takes a cycle longer through
    the array and the requantizer. ``hop_latency`` (1 or 2; default 1): cycles an activation takes from one
    array column to the next (2: a register between them, for columns far apart on the chip): each row
    then takes ``lanes`` cycles longer through the array. Results depend on none of them.
    """
    lanes: int = 16
    banks: int = 4
    bank_words: int = 4096
    acc_depth: int = 512
    requant_lanes: int | None = None
    serial_mul_bits: int | None = None
    pool_subbanks: int = 4
    overlap: bool = True
    compact_array: bool = False
    pool_read_latency: int = 1
    weight_write_latency: int = 0
    product_latency: int = 1
    hop_latency: int = 1

    def __post_init__(self):
        if self.lanes not in (4, 8, 12, 16, 20, 24, 28, 32):
            raise ValueError(f"lanes must be a multiple of 4 in [4, 32], not {self.lanes}")
        if not 3 <= self.banks <= 16:
            raise ValueError(f"banks must be in [3, 16] (MATMUL needs three), not {self.banks}")
        if self.bank_words < 16 or self.bank_words % 4 or self.bank_words & (self.bank_words - 1):
            raise ValueError(f"bank_words must be a power of two >= 16, not {self.bank_words}")
        if not 1 <= self.acc_depth <= 4096:
            raise ValueError(f"acc_depth must be in [1, 4096], not {self.acc_depth}")
        if self.requant_lanes is not None and (not isinstance(self.requant_lanes, int) or
                                               self.requant_lanes < 1 or self.lanes % self.requant_lanes):
            raise ValueError(f"requant_lanes must divide lanes ({self.lanes}), not {self.requant_lanes!r}")
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

    @property
    def rows(self):
        return self.lanes

    @property
    def cols(self):
        return self.lanes

    @property
    def pool_words(self):
        return self.banks * self.bank_words

    @property
    def host_words_per_pool_word(self):
        return self.lanes // 4

    @property
    def param_words(self):
        return PARAM_WORDS_PER_LANE_GROUP

    # -- payload layouts ------------------------------------------------------------------------------

    def pack_activations(self, a):
        """int8 A [M, K] -> pool words for MATMUL: K padded to lanes, K-tile-major: tile kt is M words."""
        a = np.asarray(a, dtype=np.int8)
        m, k = a.shape
        kt = -(-k // self.lanes)
        padded = np.zeros((m, kt * self.lanes), dtype=np.int8)
        padded[:, :k] = a
        return padded.reshape(m, kt, self.lanes).transpose(1, 0, 2).reshape(kt * m, self.lanes)

    def pack_weights(self, w):
        """int8 W [N, K] -> pool words: for each n-tile, for each k-tile, ``lanes`` words (one per k row,
        lane j = W[n0 + j, k0 + i])."""
        w = np.asarray(w, dtype=np.int8)
        n, k = w.shape
        nt, kt = -(-n // self.lanes), -(-k // self.lanes)
        padded = np.zeros((nt * self.lanes, kt * self.lanes), dtype=np.int8)
        padded[:n, :k] = w
        t = padded.reshape(nt, self.lanes, kt, self.lanes)          # [nt, j, kt, i]
        return t.transpose(0, 2, 3, 1).reshape(nt * kt * self.lanes, self.lanes)

    def pack_params(self, bias, m0, shift):
        """Per output channel int32 bias, m0 in [0, 2**31), shift in [0, 62] -> 9 pool words per n-tile."""
        n = len(bias)
        nt = -(-n // self.lanes)
        out = []
        for t in range(nt):
            sl = slice(t * self.lanes, min(n, (t + 1) * self.lanes))
            groups = []
            for values, dtype in ((bias, np.int32), (m0, np.uint32)):
                v = np.zeros(self.lanes, dtype=dtype)
                v[: sl.stop - sl.start] = np.asarray(values)[sl]
                groups.append(v.view(np.uint8).reshape(4, self.lanes))     # 4 pool words
            sh = np.zeros(self.lanes, dtype=np.uint8)
            sh[: sl.stop - sl.start] = np.asarray(shift)[sl]
            out.append(np.concatenate([groups[0], groups[1], sh[None, :]]).view(np.int8))
        return np.concatenate(out)

    def unpack_output(self, words, m, n, mode):
        """Pool words written by MATMUL -> int array [M, N] (int8/int16/int32 by mode)."""
        mode = Mode(mode)
        per = MODE_WORDS[mode]
        nt = -(-n // self.lanes)
        raw = np.asarray(words, dtype=np.int8).reshape(nt, m, per * self.lanes).view(np.uint8)
        dtype = {Mode.INT8: np.int8, Mode.INT16: np.int16, Mode.INT32: np.int32}[mode]
        vals = raw.copy().view(dtype).reshape(nt, m, self.lanes)
        return vals.transpose(1, 0, 2).reshape(m, nt * self.lanes)[:, :n]

    def words_to_host(self, words):
        """Pool words (int8 [count, lanes]) -> 32-bit host words."""
        return [int(x) for x in np.ascontiguousarray(np.asarray(words, dtype=np.int8)).view(np.uint32).ravel()]

    def words_from_host(self, host_words):
        """32-bit host words -> pool words (int8 [count, lanes])."""
        return np.asarray(host_words, dtype=np.uint32).view(np.int8).reshape(-1, self.lanes)


def header(op, count=0, flags=0):
    return (int(op) << 24) | ((flags & 0xFF) << 16) | (count & 0xFFFF)


class Program:
    """Build an instruction stream for one accelerator configuration."""

    def __init__(self, config):
        self.config = config
        self.words = []
        self.expect = 0        # answer words this program makes the device send

    def load(self, addr, pool_words):
        pool_words = np.asarray(pool_words, dtype=np.int8).reshape(-1, self.config.lanes)
        for start in range(0, len(pool_words), MAX_COUNT):
            chunk = pool_words[start:start + MAX_COUNT]
            self.words += [header(Opcode.LOAD, len(chunk)), addr + start]
            self.words += self.config.words_to_host(chunk)
        return self

    def store(self, addr, count):
        for start in range(0, count, MAX_COUNT):
            n = min(MAX_COUNT, count - start)
            self.words += [header(Opcode.STORE, n), addr + start]
            self.expect += n * self.config.host_words_per_pool_word
        return self

    def matmul(self, a_addr, w_addr, p_addr, o_addr, m, k_tiles, n_tiles, mode):
        self.words += [header(Opcode.MATMUL, flags=int(mode)), a_addr, w_addr, p_addr, o_addr, m,
                       (n_tiles << 16) | k_tiles]
        return self

    def sync(self):
        self.words.append(header(Opcode.SYNC))
        self.expect += 1
        return self

    def counters(self):
        self.words.append(header(Opcode.COUNTERS))
        self.expect += 6
        return self

    def info(self):
        self.words.append(header(Opcode.INFO))
        self.expect += 3
        return self


def parse_status(word):
    """A SYNC answer -> Error flags; raises ValueError if it is not a status word."""
    if word >> 24 != STATUS_MAGIC:
        raise ValueError(f"not a status word: {word:#010x}")
    return Error(word & 0xFF)
