"""The instruction set and its word layouts: the one contract between the accelerator and the host.

The host talks to the accelerator over a stream of 32-bit words; the accelerator answers on a stream of
32-bit words. Every instruction starts with a :data:`HEADER` word and is followed by a fixed number of
argument words (:data:`ARG_WORDS`), and for LOAD by its data. All-zero words are NOPs, so a run of zeros
flushes any half-received command. The answers: STORE's pool words, SYNC's :data:`STATUS` word,
COUNTERS' :class:`Counters`, INFO's :class:`Info`. See docs/isa.md.

Pool words are ``lanes`` bytes wide; the host carries each one as ``lanes // 4`` little-endian 32-bit
words (lane 0 in the low byte of the first word).
"""

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["ISA_VERSION", "Opcode", "Mode", "Chain", "Error", "WordLayout", "HEADER", "STATUS", "TILES", "ARG_WORDS",
           "MODE_WORDS", "MODE_BITS", "MODE_MASK", "PARAM_WORDS_PER_LANE_GROUP", "MAX_COUNT", "DeviceShape", "Info",
           "Counters", "Program", "header", "parse_status"]

ISA_VERSION = 3      # 3: MATMUL chains (Chain) skip a weight's all-zero tiles


class WordLayout:
    """Named bit fields of a 32-bit word: ``WordLayout(opcode=(24, 8), ...)``, each ``(lsb, width)``.

    :meth:`pack` and :meth:`unpack` are the software side; the hardware slices a word with :meth:`bits`
    (a Python ``slice``, which Amaranth values take) and builds one from the fields in :attr:`fields`.
    """

    def __init__(self, name, **fields):
        self.name = name
        self.fields = dict(sorted(fields.items(), key=lambda kv: kv[1][0]))      # from bit 0 up
        end = 0
        for field, (lsb, width) in self.fields.items():
            if lsb < end or width < 1 or lsb + width > 32:
                raise ValueError(f"{name}: field {field} at {lsb}+{width} overlaps or leaves the word")
            end = lsb + width

    def bits(self, field):
        lsb, width = self.fields[field]
        return slice(lsb, lsb + width)

    def width(self, field):
        return self.fields[field][1]

    def pack(self, **values):
        word = 0
        for field, value in values.items():
            lsb, width = self.fields[field]
            word |= (int(value) & ((1 << width) - 1)) << lsb
        return word

    def unpack(self, word):
        return {field: (int(word) >> lsb) & ((1 << width) - 1) for field, (lsb, width) in self.fields.items()}


class Opcode(enum.IntEnum):
    NOP = 0x00
    LOAD = 0x01        # + address; + count pool words of data
    STORE = 0x02       # + address; answers count pool words
    MATMUL = 0x03      # + 6 words: A, W, P, O addresses, M, TILES; flags = Mode | Chain
    SYNC = 0x04        # answers one STATUS word, then clears the error flags
    COUNTERS = 0x05    # answers Counters.WORDS words
    INFO = 0x06        # answers Info.WORDS words


HEADER = WordLayout("header", count=(0, 16), flags=(16, 8), opcode=(24, 8))
MAX_COUNT = (1 << HEADER.width("count")) - 1       # pool words one LOAD or STORE moves
# SYNC's answer: the sticky error flags, and a constant that tells a status word from data
STATUS = WordLayout("status", errors=(0, 4), magic=(24, 8))
STATUS_MAGIC = 0xA5
# MATMUL's last argument word
TILES = WordLayout("tiles", k_tiles=(0, 16), n_tiles=(16, 16))

ARG_WORDS = {Opcode.NOP: 0, Opcode.LOAD: 1, Opcode.STORE: 1, Opcode.MATMUL: 6, Opcode.SYNC: 0,
             Opcode.COUNTERS: 0, Opcode.INFO: 0}


class Mode(enum.IntEnum):
    """MATMUL output: requantized int8, requantized int16, or the int32 accumulator plus bias (bypass)."""
    INT8 = 0
    INT16 = 1
    INT32 = 2


class Chain(enum.IntFlag):
    """MATMUL flags beside its mode (header flags bits 2 and 3), for one n-tile (``n_tiles`` 1) only.

    A GEMM whose weights hold all-zero ``lanes x lanes`` tiles runs, for each n-tile, as a chain of
    MATMULs over its runs of non-zero k-tiles: every one but the last HOLDs its sums, every one but the
    first CONTINUEs them. The zero tiles are neither sent, stored, loaded nor streamed, and the sums are
    those of the whole k range (the zero tiles add nothing)."""
    CONTINUE = 1 << 2   # start from the sums the previous MATMUL held (it HOLDs, same M), not from zero
    HOLD = 1 << 3       # keep the sums in the accumulators for the next MATMUL, write no output


MODE_MASK = 0b11        # the mode's bits in a MATMUL's flags


MODE_WORDS = {Mode.INT8: 1, Mode.INT16: 2, Mode.INT32: 4}   # pool words per output row
MODE_BITS = {Mode.INT8: 8, Mode.INT16: 16, Mode.INT32: None}   # saturation width; None: no requant


class Error(enum.IntFlag):
    """Sticky error flags, reported (and cleared) by SYNC."""
    OPCODE = 1 << 0     # unknown opcode: the header word is dropped
    ADDRESS = 1 << 1    # LOAD/STORE/MATMUL range outside the pool, misaligned, or overlapping
    SHAPE = 1 << 2      # MATMUL shape the array cannot take (M, tile counts, mode, flags, a broken chain)
    BANK = 1 << 3       # MATMUL operands sharing a bank they cannot share


# Requant parameters per n-tile, in pool words: bias (int32 per lane, 4 words), m0 (uint32 per lane,
# 4 words), shift (uint8 per lane, 1 word).
PARAM_WORDS_PER_LANE_GROUP = 9


@dataclass(frozen=True)
class DeviceShape:
    """What the host must know of a device to compile for it, and all that INFO and HELLO report.

    ``lanes`` is the array's rows and columns (square), a multiple of 4 from 4 to 32. The pool has
    ``banks`` banks (at least 3: a MATMUL reads A, W/P and writes O in different banks) of
    ``bank_words`` pool words each (a power of two). ``acc_depth`` bounds a MATMUL's M. How the hardware
    builds that shape (:class:`ambert.hw.config.Implementation`) changes no result and is not here.
    """
    lanes: int = 16
    banks: int = 4
    bank_words: int = 4096
    acc_depth: int = 512

    def __post_init__(self):
        if self.lanes not in (4, 8, 12, 16, 20, 24, 28, 32):
            raise ValueError(f"lanes must be a multiple of 4 in [4, 32], not {self.lanes!r}")
        if not isinstance(self.banks, int) or not 3 <= self.banks <= 16:
            raise ValueError(f"banks must be in [3, 16] (MATMUL needs three), not {self.banks!r}")
        if not isinstance(self.bank_words, int) or self.bank_words < 16 or self.bank_words & (self.bank_words - 1):
            raise ValueError(f"bank_words must be a power of two >= 16, not {self.bank_words!r}")
        if not isinstance(self.acc_depth, int) or not 1 <= self.acc_depth <= 4096:
            raise ValueError(f"acc_depth must be in [1, 4096], not {self.acc_depth!r}")

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

    def __str__(self):
        return f"{self.lanes}x{self.lanes} array, {self.banks} x {self.bank_words} pool words, M <= {self.acc_depth}"

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

    def weight_runs(self, w):
        """For each n-tile of int8 W [N, K], its runs of k-tiles holding a non-zero weight, as (first
        k-tile, k-tiles); an all-zero n-tile gets one run of one (zero) tile, so its bias still passes
        through the epilogue. A weight with no zero tile has one run an n-tile: every k-tile."""
        w = np.asarray(w, dtype=np.int8)
        n, k = w.shape
        nt, kt = -(-n // self.lanes), -(-k // self.lanes)
        padded = np.zeros((nt * self.lanes, kt * self.lanes), dtype=np.int8)
        padded[:n, :k] = w
        nonzero = padded.reshape(nt, self.lanes, kt, self.lanes).any(axis=(1, 3))
        runs = []
        for row in nonzero:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
            runs.append([(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])] or [(0, 1)])
        return runs

    def pack_weight_runs(self, w, runs):
        """int8 W [N, K] -> pool words of the tiles in ``runs`` (:meth:`weight_runs`) only: n-tile by
        n-tile, run by run, each k-tile's ``lanes`` words as :meth:`pack_weights` lays them out."""
        dense = self.pack_weights(w)
        kt = -(-np.asarray(w).shape[1] // self.lanes)
        L = self.lanes
        picked = [dense[(t * kt + k0) * L:(t * kt + k0 + count) * L]
                  for t, tile_runs in enumerate(runs) for k0, count in tile_runs]
        return np.concatenate(picked) if picked else dense[:0]

    def pack_params(self, bias, m0, shift):
        """Per output channel int32 bias, m0 in [0, 2**31), shift in [0, REQUANT_SHIFT_MAX] -> 9 pool words
        per n-tile."""
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


class Info(NamedTuple):
    """INFO's answer: the ISA version and the device's shape, in three words."""
    version: int
    shape: DeviceShape

    WORDS = 3
    FIRST = WordLayout("info", banks=(0, 8), rows=(8, 8), cols=(16, 8), version=(24, 8))

    def pack(self):
        s = self.shape
        return [self.FIRST.pack(banks=s.banks, rows=s.lanes, cols=s.lanes, version=self.version),
                s.bank_words, s.acc_depth]

    @classmethod
    def unpack(cls, words):
        if len(words) != cls.WORDS:
            raise ValueError(f"INFO answers {cls.WORDS} words, not {len(words)}")
        first = cls.FIRST.unpack(words[0])
        if first["rows"] != first["cols"]:
            raise ValueError(f"INFO reports a {first['rows']}x{first['cols']} array; ambert's are square")
        return cls(first["version"], DeviceShape(first["rows"], first["banks"], int(words[1]), int(words[2])))


class Counters(NamedTuple):
    """COUNTERS' answer: cycles busy, cycles a running unit stalled, multiply-accumulates; each 64 bits,
    sent low word first, in this order."""
    busy: int
    stalled: int
    macs: int

    WORDS = 6

    def pack(self):
        return [w for value in self for w in (value & 0xFFFFFFFF, value >> 32)]

    @classmethod
    def unpack(cls, words):
        if len(words) != cls.WORDS:
            raise ValueError(f"COUNTERS answers {cls.WORDS} words, not {len(words)}")
        return cls(*(int(words[k]) | int(words[k + 1]) << 32 for k in range(0, cls.WORDS, 2)))


def header(op, count=0, flags=0):
    """A :data:`HEADER` word."""
    return HEADER.pack(opcode=op, flags=flags, count=count)


def parse_status(word):
    """A SYNC answer -> Error flags; raises ValueError if it is not a :data:`STATUS` word."""
    fields = STATUS.unpack(word)
    if fields["magic"] != STATUS_MAGIC or word & ~(STATUS.pack(errors=-1, magic=-1) & 0xFFFFFFFF):
        raise ValueError(f"not a status word: {int(word):#010x}")
    return Error(fields["errors"])


class Program:
    """Build an instruction stream for one device shape."""

    def __init__(self, shape):
        self.shape = shape
        self.words = []
        self.expect = 0        # answer words this program makes the device send

    def load(self, addr, pool_words):
        pool_words = np.asarray(pool_words, dtype=np.int8).reshape(-1, self.shape.lanes)
        for start in range(0, len(pool_words), MAX_COUNT):
            chunk = pool_words[start:start + MAX_COUNT]
            self.words += [header(Opcode.LOAD, len(chunk)), addr + start]
            self.words += self.shape.words_to_host(chunk)
        return self

    def store(self, addr, count):
        for start in range(0, count, MAX_COUNT):
            n = min(MAX_COUNT, count - start)
            self.words += [header(Opcode.STORE, n), addr + start]
            self.expect += n * self.shape.host_words_per_pool_word
        return self

    def matmul(self, a_addr, w_addr, p_addr, o_addr, m, k_tiles, n_tiles, mode, chain=Chain(0)):
        self.words += [header(Opcode.MATMUL, flags=int(mode) | int(chain)), a_addr, w_addr, p_addr, o_addr, m,
                       TILES.pack(k_tiles=k_tiles, n_tiles=n_tiles)]
        return self

    def sync(self):
        self.words.append(header(Opcode.SYNC))
        self.expect += 1
        return self

    def counters(self):
        self.words.append(header(Opcode.COUNTERS))
        self.expect += Counters.WORDS
        return self

    def info(self):
        self.words.append(header(Opcode.INFO))
        self.expect += Info.WORDS
        return self
