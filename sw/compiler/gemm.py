"""Compile GEMMs (each ``requant(a @ w.T + bias)``) into one pipelined instruction stream.

Each GEMM is split into MATMULs ("steps") whose operands fit the pool: N-chunks of weights (small, so
the next chunk loads while this one computes) and M-chunks of at most ``acc_depth`` rows. The stream is
software-pipelined, so the device's units overlap (docs/isa.md): while step i computes, the output of
step i-1 is stored and the operands of step i+1 are loaded::

    LOAD in(0)   MATMUL 0   LOAD in(1)   MATMUL 1   STORE out(0)   LOAD in(2)   MATMUL 2   STORE out(1) …

Every tensor gets a pool range from the liveness-based :class:`~ambert.sw.compiler.pool.PoolPlanner`; the
placement keeps each prefetch off the bank the running MATMUL writes, and each output off the banks
the next MATMUL reads, so neither waits. Weights can be prefetched for a later program (``prefetch``)
and stay resident in the pool between programs. Array shape, pool size and layouts all come from the
device's :class:`ambert.proto.isa.DeviceShape`.
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ambert.proto.isa import MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, TILES, Chain, Mode, Program

from .pool import PoolFull, PoolPlanner

__all__ = ["balanced", "column_words", "GemmPlan", "GemmOp", "Residency", "plan_gemm", "compile_gemms", "gemm_program"]

_DTYPES = {Mode.INT8: np.int8, Mode.INT16: np.int16, Mode.INT32: np.int32}


@dataclass(frozen=True)
class GemmPlan:
    m: int
    k: int
    n: int
    mode: Mode
    k_tiles: int
    n_tiles: int
    m_chunk: int            # rows per MATMUL
    n_tiles_chunk: int      # n-tiles per MATMUL
    lanes: int
    row_quantum: int = 1    # row chunks padded to a multiple of this (a chained GEMM's outputs stay aligned)

    @property
    def words_per_n_tile(self):
        """Pool words of one n-tile's weights and requant parameters."""
        return self.k_tiles * self.lanes + PARAM_WORDS_PER_LANE_GROUP

    def n_chunks(self, split_last=False):
        """(first n-tile, n-tiles) of each N-chunk. ``split_last``: the last n-tile is a chunk of its own,
        so the output that nothing can overlap (a program's last) is short."""
        bounds = list(range(0, self.n_tiles, self.n_tiles_chunk))
        sizes = [min(self.n_tiles_chunk, self.n_tiles - n0) for n0 in bounds]
        if split_last and sizes[-1] > 1:
            sizes[-1] -= 1
            bounds.append(self.n_tiles - 1)
            sizes.append(1)
        return list(zip(bounds, sizes))

    @property
    def rows_first(self):
        """The loop order of the GEMM's MATMULs. Weight chunk by weight chunk (False), each weight chunk
        loaded once while every row chunk of A passes it (A is loaded once per weight chunk unless it is
        one chunk, then once); or row chunk by row chunk (True), each row chunk of A loaded once while
        every weight chunk passes it (the weights are loaded once per row chunk, less what stays resident).
        The one that moves fewer pool words."""
        m_chunks = -(-self.m // self.m_chunk)
        if m_chunks == 1:
            return False
        a_words, w_words = self.m * self.k_tiles, self.n_tiles * self.words_per_n_tile
        return a_words + w_words * m_chunks < w_words + a_words * len(self.n_chunks())

    def chunks(self, split_last=False):
        """Yield (first n-tile, n-tiles, first row, rows) of each MATMUL in the order of ``rows_first``;
        ``split_last`` applies to the last row chunk's weight chunks only."""
        rows = [(m0, min(self.m_chunk, self.m - m0)) for m0 in range(0, self.m, self.m_chunk)]
        if self.rows_first:
            for i, (m0, rc) in enumerate(rows):
                for n0, ntc in self.n_chunks(split_last and i == len(rows) - 1):
                    yield n0, ntc, m0, rc
        else:
            for n0, ntc in self.n_chunks(split_last):
                for m0, rc in rows:
                    yield n0, ntc, m0, rc


def column_words(shape, k):
    """Pool words one n-tile of a depth-``k`` GEMM's weights takes: its k-tiles and its parameters."""
    return -(-k // shape.lanes) * shape.lanes + PARAM_WORDS_PER_LANE_GROUP


def balanced(total, most):
    """The chunk size that splits ``total`` into as few equal-as-possible chunks of at most ``most``."""
    return -(-total // -(-total // most))


def plan_gemm(shape, m, k, n, mode, chained=False):
    """Choose chunk sizes: weight chunks of about a quarter of a bank (so two chunks and the outputs
    fit beside the activations while the pipeline runs), activations and outputs within a bank; raises
    ValueError if one n-tile of the GEMM cannot fit. ``chained``: the GEMM runs as chains of one n-tile
    MATMULs (its weights have zero tiles), whose outputs start at M x row words into the output region,
    so each row chunk is padded to rows whose output words are a multiple of 4 (the alignment O needs)."""
    if min(m, k, n) < 1:
        raise ValueError(f"GEMM shape must be positive, not {m}x{k}x{n}")
    mode = Mode(mode)
    lanes, bank = shape.lanes, shape.bank_words
    k_tiles = -(-k // lanes)
    n_tiles = -(-n // lanes)
    per_n_tile = column_words(shape, k)
    if per_n_tile > bank or k_tiles > bank:
        raise ValueError(f"K={k} needs {per_n_tile} pool words per weight tile column; a bank has {bank}")
    nt_chunk = min(n_tiles, max(1, (bank // 4) // per_n_tile), (1 << TILES.width("n_tiles")) - 1)
    quantum = 4 // MODE_WORDS[mode] if chained else 1

    def most_rows(nt_chunk):
        most = min(shape.acc_depth, bank // k_tiles, bank // (MODE_WORDS[mode] * nt_chunk))
        return min(-(-m // quantum) * quantum, most - most % quantum)
    m_chunk = most_rows(nt_chunk)
    while m_chunk < 1 and nt_chunk > 1:
        nt_chunk //= 2
        m_chunk = most_rows(nt_chunk)
    if m_chunk < 1:
        raise ValueError(f"GEMM {m}x{k}x{n} does not fit a bank of {bank} words")
    # equal chunks: a short last chunk would leave the array waiting on loads
    rows = -(-balanced(m, m_chunk) // quantum) * quantum
    return GemmPlan(m=m, k=k, n=n, mode=mode, k_tiles=k_tiles, n_tiles=n_tiles, m_chunk=rows,
                    n_tiles_chunk=balanced(n_tiles, nt_chunk), lanes=lanes, row_quantum=quantum)


@dataclass
class GemmOp:
    """One GEMM + requant: int8 ``a`` [M, K], int8 ``w`` [N, K], per-channel (or scalar) ``bias``, ``m0``,
    ``shift``; ``mode`` picks int8 / int16 output or the int32 bypass. ``resident``: the weights are a
    model's (not a request's keys or values), worth leaving in the pool for later programs."""
    a: np.ndarray
    w: np.ndarray
    bias: object
    m0: object
    shift: object
    mode: Mode
    resident: bool = False

    def __post_init__(self):
        self.a, self.w = np.asarray(self.a, dtype=np.int8), np.asarray(self.w, dtype=np.int8)
        if self.a.ndim != 2 or self.w.ndim != 2 or self.w.shape[1] != self.a.shape[1]:
            raise ValueError(f"inner dimensions differ: a is {self.a.shape}, w is {self.w.shape}")
        n = self.w.shape[0]
        self.bias, self.m0, self.shift = (np.broadcast_to(np.asarray(v, dtype=np.int64), (n,))
                                          for v in (self.bias, self.m0, self.shift))
        self.mode = Mode(self.mode)
        self._runs = None

    def runs(self, shape):
        """Each n-tile's runs of non-zero k-tiles (``DeviceShape.weight_runs``), or None when no tile of
        the weights is all zero (the GEMM then runs unchained)."""
        if self._runs is None:
            runs = shape.weight_runs(self.w)
            k_tiles = -(-self.w.shape[1] // shape.lanes)
            self._runs = (None if all(r == [(0, k_tiles)] for r in runs) else runs,)
        return self._runs[0]

    def weight_chunk(self, shape, plan, nt0, ntc):
        """The pool words of one N-chunk: packed weights (a chained GEMM's non-zero tiles only), then
        packed requant parameters; and a digest that names the content (for residency)."""
        cols = slice(nt0 * shape.lanes, min(self.w.shape[0], (nt0 + ntc) * shape.lanes))
        runs = self.runs(shape)
        weights = (shape.pack_weights(self.w[cols]) if runs is None
                   else shape.pack_weight_runs(self.w[cols], runs[nt0:nt0 + ntc]))
        words = np.concatenate([weights, shape.pack_params(self.bias[cols], self.m0[cols], self.shift[cols])])
        return words, hashlib.blake2b(words.tobytes(), digest_size=16).digest()


@dataclass
class Residency:
    """What a device's pool holds across programs: weight chunks by content digest — prefetched ones, and
    a model's weights left where they were used while the pool has room, so a repeated request (of any
    model sharing the device) does not send them again — and the planner that owns the ranges.

    A program short of room releases the coldest chunk first: the one used least often, and among equals
    the one left most recently. Use counts keep hot weights (a model asked often) over cold ones; the
    tie rule keeps a model larger than the pool from flushing it each pass (with weights streamed in a
    cycle, releasing the least recently used would release each chunk just before its next use, while
    releasing the most recent keeps the rest of the pool for the next pass). Reset it whenever the
    device is reset."""
    shape: object
    planner: PoolPlanner = None
    chunks: dict = field(default_factory=dict)      # digest -> Region, in the order they were left
    uses: dict = field(default_factory=dict)        # digest -> programs that used it (kept or not)
    prefetched: set = field(default_factory=set)    # digests loaded ahead for the next program

    def __post_init__(self):
        self.planner = self.planner or PoolPlanner(self.shape)

    def reset(self):
        self.planner.reset()
        self.chunks.clear()
        self.prefetched.clear()

    def keep(self, digest, region):
        """Leave a used weight chunk in the pool (a second copy of a chunk already kept is released)."""
        old = self.chunks.pop(digest, None)
        if old is not None and old is not region:
            self.planner.release(region)
            region = old
        self.chunks[digest] = region
        if len(self.uses) >= 1 << 16 and digest not in self.uses:
            self.uses = {d: self.uses[d] for d in self.chunks if d in self.uses}    # forget the long gone
        self.uses[digest] = self.uses.get(digest, 0) + 1

    def evict_coldest(self):
        """Release the coldest chunk, a prefetched one (which the next program is about to use) only when
        nothing else is left; False if there is none. (A chunk a program is using is not here: it left
        ``chunks`` when the program found it.)"""
        coldest = None
        for d in self.chunks:                   # oldest first: a later equal wins, the most recent
            if coldest is None or self._heat(d) <= self._heat(coldest):
                coldest = d
        if coldest is None:
            return False
        self.planner.release(self.chunks.pop(coldest))
        return True

    def has_room(self, region):
        """Whether ``region`` may stay: kept weights take at most a quarter of the pool, so the programs'
        own operands keep the banks they need to overlap loads with compute."""
        kept = sum(r.words for d, r in self.chunks.items() if d not in self.prefetched)
        return kept + region.words <= self.shape.pool_words // 4

    def _heat(self, digest):
        return (digest in self.prefetched, self.uses.get(digest, 0))

    def prefetch(self, digest, region):
        """A chunk loaded for the next program."""
        self.chunks[digest] = region
        self.prefetched.add(digest)

    def take(self, digest):
        """The region of a resident chunk a program is about to use (it leaves ``chunks``), or None."""
        self.prefetched.discard(digest)
        return self.chunks.pop(digest, None)

    def evict(self):
        """Release every resident chunk; True if anything was released."""
        gone = list(self.chunks)
        for d in gone:
            self.planner.release(self.chunks.pop(d))
        self.prefetched.clear()
        return bool(gone)


@dataclass
class _Step:
    op: int
    plan: GemmPlan
    nt0: int
    ntc: int
    r0: int
    rc: int
    a_key: tuple
    w_key: tuple
    a_last: bool            # the last step that reads this A chunk
    w_last: bool            # ... this weight chunk

    @property
    def rows(self):
        """The rows the step computes: ``rc``, padded up to the plan's row quantum."""
        q = self.plan.row_quantum
        return -(-self.rc // q) * q


def _steps(shape, ops, plans):
    steps = []
    for j, (op, plan) in enumerate(zip(ops, plans)):
        chunks = list(plan.chunks(split_last=j == len(ops) - 1))
        one_m, rows_first = plan.m_chunk >= plan.m, plan.rows_first

        # an operand is held while consecutive steps use it: A for a whole row chunk when rows come
        # first (or there is one), weights for a whole weight chunk when they do not
        def a_key(nt0, r0):
            return ("A", j, r0) if one_m or rows_first else ("A", j, r0, nt0)

        def w_key(nt0, r0):
            return ("W", j, nt0, r0) if rows_first else ("W", j, nt0)

        for i, (nt0, ntc, r0, rc) in enumerate(chunks):
            nxt = chunks[i + 1] if i + 1 < len(chunks) else None
            a, w = a_key(nt0, r0), w_key(nt0, r0)
            steps.append(_Step(j, plan, nt0, ntc, r0, rc, a_key=a, w_key=w,
                               a_last=nxt is None or a_key(nxt[0], nxt[2]) != a,
                               w_last=nxt is None or w_key(nxt[0], nxt[2]) != w))
    return steps


@dataclass
class Compiled:
    """A compiled program: ``decode(answers)`` -> ``(outputs, status word)``; the pool report."""
    program: Program
    decode: object
    steps: int
    peak_words: int
    naive_words: int


def compile_gemms(shape, ops, residency=None, prefetch=None):
    """Compile ``ops`` (a list of :class:`GemmOp`) into one program ending in SYNC.

    ``residency`` (a :class:`Residency`) carries the pool across programs: weight chunks already resident
    are not loaded again. ``prefetch``, a :class:`GemmOp` whose ``a`` may be empty, names the weights of a
    GEMM a later program will run: its first chunk loads while this program's last MATMUL computes and
    stays resident. Raises ValueError if a GEMM cannot fit the pool.
    """
    residency = residency or Residency(shape)
    pool = residency.planner
    # this program's report: what it holds at its peak, against every range it allocates (plus what
    # it found resident) with nothing ever reused
    pool.peak_words = pool.live_words
    naive_base = pool.naive_words - pool.live_words
    plans = [plan_gemm(shape, op.a.shape[0], op.a.shape[1], op.w.shape[0], op.mode, op.runs(shape) is not None)
             for op in ops]
    steps = _steps(shape, ops, plans)
    prog = Program(shape)
    lanes = shape.lanes
    held = {}               # key -> Region of this program's live inputs
    blocks = []             # (op, rows, cols, answer words) of each STORE, in answer order
    pending = None          # (output, block) computed or computing, not yet stored
    stored = []             # regions whose STORE is emitted, released once the next STORE is
    digests = {}            # w_key -> the digest of its chunk

    def alloc(words, name, forbid=(), avoid=()):
        """Allocate; when the pool is short, release resident weights (the coldest first), then give up
        on overlap step by step before failing."""
        while True:
            try:
                return pool.alloc(words, name, forbid, avoid)
            except PoolFull:
                if not residency.evict_coldest():
                    break
        try:
            return pool.alloc(words, name, forbid, ())
        except PoolFull:
            store_pending()
            while stored:
                pool.release(stored.pop())
            residency.evict()
        return pool.alloc(words, name, forbid, ())

    def store_pending():
        nonlocal pending
        if pending is not None:
            out, block = pending
            prog.store(out.addr, out.words_used)
            blocks.append(block)
            stored.append(out.region)
            pending = None

    def load_inputs(step, avoid, load):
        op = ops[step.op]
        w_words = None
        if step.w_key not in held:
            w_words, digest = op.weight_chunk(shape, step.plan, step.nt0, step.ntc)
            digests[step.w_key] = digest
            region = residency.take(digest)                  # left by an earlier program
            if region is not None and step.a_key in held and held[step.a_key].bank == region.bank:
                pool.release(region)        # in the bank of this GEMM's A: one MATMUL cannot read both
                region = None
            if region is not None:
                held[step.w_key], w_words = region, None
        if step.a_key not in held:
            a = op.a[step.r0:step.r0 + step.rc]
            if step.rows > step.rc:             # a chained GEMM's rows, padded with zero rows
                a = np.concatenate([a, np.zeros((step.rows - step.rc, a.shape[1]), dtype=np.int8)])
            a_words = shape.pack_activations(a)
            forbid = {held[step.w_key].bank} if step.w_key in held else set()
            region = alloc(len(a_words), f"A{step.a_key}", forbid=forbid, avoid=avoid)
            load(region.addr, a_words)
            held[step.a_key] = region
        if w_words is not None:
            region = alloc(len(w_words), f"W{step.w_key}", forbid={held[step.a_key].bank}, avoid=avoid)
            load(region.addr, w_words)
            held[step.w_key] = region

    def alloc_output(step):
        words = step.ntc * step.rows * MODE_WORDS[step.plan.mode]
        region = alloc(words, f"O{step.op}", forbid={held[step.a_key].bank, held[step.w_key].bank})
        return _Out(region, words)

    if not steps:
        prog.sync()
        return Compiled(prog, lambda answers: ([], answers[0]), 0, pool.peak_words, pool.naive_words - naive_base)
    prefetch_at = _prefetch_step(shape, ops, steps, prefetch)
    load_inputs(steps[0], avoid=(), load=prog.load)
    out = alloc_output(steps[0])
    for i, step in enumerate(steps):
        op, plan = ops[step.op], step.plan
        a_reg, w_reg = held[step.a_key], held[step.w_key]
        runs = op.runs(shape)
        if runs is None:
            p_addr = w_reg.addr + step.ntc * plan.k_tiles * lanes
            chain = [((a_reg.addr, w_reg.addr, p_addr, out.addr, step.rc, plan.k_tiles, step.ntc, plan.mode), 1)]
        else:
            chain = _chains(shape, runs[step.nt0:step.nt0 + step.ntc], a_reg.addr, w_reg.addr, out.addr,
                            step.rows, plan.mode)
        prog.matmul(*chain[0][0])
        # while this step computes, the previous output leaves and the next step's operands arrive (off
        # the bank this step writes); a chain's MATMULs run one after another, so its loads go in
        # between them, each share as long as the MATMUL before it, or only its first would overlap them
        store_pending()
        loads = []
        load = prog.load if len(chain) == 1 else lambda addr, words: loads.append((addr, words))
        if i + 1 < len(steps):
            load_inputs(steps[i + 1], avoid={out.region.bank}, load=load)
        if prefetch is not None and i == prefetch_at:
            _prefetch(shape, residency, prefetch, avoid={out.region.bank}, load=load, alloc=alloc)
            prefetch = None
        if len(chain) > 1:
            _interleave(prog, chain, loads)
        # the store unit reads a range until the next STORE may start: reuse it only after that
        while len(stored) > 1:
            pool.release(stored.pop(0))
        if step.a_last:
            pool.release(held.pop(step.a_key))
        if step.w_last:
            region = held.pop(step.w_key)
            if op.resident and residency.has_room(region):
                residency.keep(digests[step.w_key], region)
            else:
                pool.release(region)
        cols = slice(step.nt0 * lanes, min(op.w.shape[0], (step.nt0 + step.ntc) * lanes))
        pending = (out, (step.op, slice(step.r0, step.r0 + step.rc), cols, step.rows,
                         out.words_used * shape.host_words_per_pool_word))
        if i + 1 < len(steps):
            out = alloc_output(steps[i + 1])
    store_pending()
    while stored:
        pool.release(stored.pop())
    prog.sync()
    shapes = [(op.a.shape[0], op.w.shape[0], op.mode) for op in ops]

    def decode(answers):
        outs = [np.zeros((m, n), dtype=_DTYPES[mode]) for m, n, mode in shapes]
        pos = 0
        for j, rows, cols, computed, count in blocks:
            chunk = shape.words_from_host(answers[pos:pos + count])
            outs[j][rows, cols] = shape.unpack_output(chunk, computed, cols.stop - cols.start,
                                                       shapes[j][2])[:rows.stop - rows.start]
            pos += count
        return outs, answers[pos]

    return Compiled(prog, decode, len(steps), pool.peak_words, pool.naive_words - naive_base)


def _chains(shape, runs, a_addr, w_addr, o_addr, rows, mode):
    """The MATMULs of a chained step, as (arguments of ``Program.matmul``, k-tiles): for each n-tile (its
    outputs ``rows`` x row words apart), one MATMUL a run of non-zero k-tiles, all but the last HOLDing
    their sums, all but the first CONTINUing them (``proto.isa.Chain``); the weights are the runs'
    tiles back to back, the parameters after them."""
    lanes, per_row = shape.lanes, MODE_WORDS[mode]
    p_addr = w_addr + sum(count for tile_runs in runs for _, count in tile_runs) * lanes
    out = []
    for t, tile_runs in enumerate(runs):
        for i, (k0, count) in enumerate(tile_runs):
            chain = (Chain.CONTINUE if i else Chain(0)) | (Chain.HOLD if i + 1 < len(tile_runs) else Chain(0))
            out.append(((a_addr + k0 * rows, w_addr, p_addr + t * PARAM_WORDS_PER_LANE_GROUP,
                         o_addr + t * rows * per_row, rows, count, 1, mode, chain), count))
            w_addr += count * lanes
    return out


def _interleave(prog, chain, loads):
    """The chain's MATMULs after its first, each preceded by the share of ``loads`` ((address, pool words)
    pairs, split anywhere) that the MATMUL before it overlaps: in proportion to its k-tiles."""
    pieces = [(addr, np.asarray(words)) for addr, words in loads]
    total, done = sum(len(w) for _, w in pieces), 0
    tiles = [count for _, count in chain]
    for j, (args, _) in enumerate(chain[1:]):
        goal = total * sum(tiles[:j + 1]) // sum(tiles)
        while done < goal and pieces:
            addr, words = pieces[0]
            take = min(len(words), goal - done)
            prog.load(addr, words[:take])
            pieces[0] = (addr + take, words[take:])
            if take == len(words):
                pieces.pop(0)
            done += take
        prog.matmul(*args)
    for addr, words in pieces:
        if len(words):
            prog.load(addr, words)


@dataclass
class _Out:
    region: object
    words_used: int

    @property
    def addr(self):
        return self.region.addr


def _prefetch_step(shape, ops, steps, prefetch):
    """The step during which to load the next program's weights: the latest one whose compute leaves
    room for them beside its own transfers (estimated in cycles), else the one with the most room."""
    if prefetch is None:
        return None
    h = shape.host_words_per_pool_word
    plan = plan_gemm(shape, max(1, prefetch.a.shape[0]), prefetch.w.shape[1], prefetch.w.shape[0], prefetch.mode)
    need = plan.n_chunks()[0][1] * plan.words_per_n_tile * h
    room = []
    for i, st in enumerate(steps):
        compute = st.ntc * st.plan.k_tiles * max(st.rc, 3 * shape.lanes + 20)
        busy = st.ntc * st.rc * MODE_WORDS[st.plan.mode] * h           # the store of this step's output
        if i + 1 < len(steps):
            nxt = steps[i + 1]
            busy += nxt.ntc * nxt.plan.words_per_n_tile * h
        room.append(compute - busy)
    fits = [i for i, r in enumerate(room) if r >= need]
    return fits[-1] if fits else max(range(len(steps)), key=room.__getitem__)


def _prefetch(shape, residency, op, avoid, load, alloc):
    plan = plan_gemm(shape, max(1, op.a.shape[0]), op.w.shape[1], op.w.shape[0], op.mode)
    words, digest = op.weight_chunk(shape, plan, *plan.n_chunks()[0])
    if digest in residency.chunks:
        return
    try:
        region = alloc(len(words), "prefetch", avoid=avoid)
    except PoolFull:
        return                  # no room: the next program loads it itself
    load(region.addr, words)
    residency.prefetch(digest, region)


def gemm_program(shape, a, w, bias, m0, shift, mode):
    """Return ``(program, decode)`` for one GEMM on an empty pool: run the program, then
    ``decode(answers)`` gives the [M, N] result of ``requant(a @ w.T + bias)`` exactly as ``ref_gemm`` +
    ``ref_requant`` define it (``mode`` INT32: the int32 ``a @ w.T + bias``) and the SYNC status word."""
    compiled = compile_gemms(shape, [GemmOp(a, w, bias, m0, shift, mode)])

    def decode(answers):
        outs, status = compiled.decode(answers)
        return outs[0], status

    return compiled.program, decode
