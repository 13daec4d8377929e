"""The instruction sequencer: decodes the host stream, moves data in and out of the pool, starts MATMULs."""

from functools import partial
from types import SimpleNamespace

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .engine import mode_words
from ambert.proto.isa import (ARG_WORDS, HEADER, ISA_VERSION, MODE_MASK, PARAM_WORDS_PER_LANE_GROUP, STATUS,
                              STATUS_MAGIC, TILES, Chain, Counters, Error, Info, Mode, Opcode)
from .mac import registered_product

__all__ = ["Sequencer", "word_of"]


def word_of(layout, **values):
    """A 32-bit word of ``layout`` (:class:`ambert.proto.isa.WordLayout`): each field from an Amaranth
    value or an int, the bits between fields zero."""
    parts, at = [], 0
    for field, (lsb, width) in layout.fields.items():
        if lsb > at:
            parts.append(Const(0, lsb - at))
        value = values[field]
        parts.append(Const(value, width) if isinstance(value, int) else value)
        at = lsb + width
    if at < 32:
        parts.append(Const(0, 32 - at))
    return Cat(*parts)


class Sequencer(wiring.Component):
    """Decode the host's instruction stream (see ``proto.isa`` and docs/isa.md).

    ``i`` takes 32-bit words; ``o`` gives the answers of STORE, SYNC, COUNTERS and INFO. Every bad
    command sets a sticky flag in ``error`` and is dropped whole — an unknown opcode is one word; a LOAD
    with a bad range still consumes (and discards) the data its header announced; a bad STORE answers
    nothing; a bad MATMUL does not run — and decoding goes on. ``o`` honours backpressure; ``i`` is never
    read faster than one word a cycle.

    Three units work at once, as in Gemmini's load/execute/store controllers: the decoder runs LOADs
    itself, hands a MATMUL to the engine (``mm_start``, then ``mm_done``) and a STORE to the store unit,
    and goes on decoding. A command waits at dispatch while its unit is busy, or while it would clash
    with a running one: on a bank port (each bank has one read and one write port: the MATMUL reads its
    A, W and P banks and writes its O bank, a STORE reads, a LOAD writes) or on data (a LOAD over a range
    the running MATMUL reads or the running STORE still has to send; a STORE of the range the MATMUL is
    writing; a MATMUL writing over the range being stored). SYNC, COUNTERS and INFO wait until both units
    are idle. So a stream means exactly what it means run one command at a time — only sooner.

    The store unit reads up to ``2 + config.impl.pool_read_latency`` words ahead, so a STORE sends one host word
    every cycle the host takes one. With ``config.impl.overlap`` False every command waits for both units to be
    idle, and the store unit reads one word ahead. Pool access: ``rd_*`` (the store unit; data
    ``config.impl.pool_read_latency`` cycles after ``rd_en``) and ``wr_*`` (LOAD), global word addresses.
    ``busy``: the store unit or a MATMUL is running.
    """

    def __init__(self, config):
        self.config = c = config
        self.word_bits = 8 * c.shape.lanes
        self.addr_bits = max(1, (c.shape.pool_words - 1).bit_length())
        super().__init__({
            "i": In(stream.Signature(32)),
            "o": Out(stream.Signature(32)),
            "error": Out(4),
            "busy": Out(1),
            "rd_addr": Out(self.addr_bits), "rd_en": Out(1), "rd_data": In(self.word_bits),
            "wr_addr": Out(self.addr_bits), "wr_en": Out(1), "wr_data": Out(self.word_bits),
            "mm_start": Out(1), "mm_done": In(1),
            "mm_a": Out(self.addr_bits), "mm_w": Out(self.addr_bits), "mm_p": Out(self.addr_bits),
            "mm_o": Out(self.addr_bits), "mm_m": Out(16), "mm_k_tiles": Out(16), "mm_n_tiles": Out(16),
            "mm_mode": Out(2), "mm_continue": Out(1), "mm_hold": Out(1),
            "cnt_busy": In(64), "cnt_stalled": In(64), "cnt_macs": In(64),
        })

    def elaborate(self, platform):
        """The decoder and its units in five parts, each adding its logic to ``m`` in turn and its signals
        to ``s``, which the later parts read: the command registers and the units' bookkeeping, the
        answers, the MATMUL checks, the clash checks, the store unit, and the decoder's FSM."""
        m = Module()
        c = self.config
        s = SimpleNamespace(H=c.shape.lanes // 4,                 # host words per pool word
                            bank_bits=(c.shape.bank_words - 1).bit_length(), A=self.addr_bits)
        self._registers(m, s)
        self._answers(m, s)
        self._matmul_checks(m, s, platform)
        self._clashes(m, s)
        self._store_unit(m, s)
        self._decoder(m, s)
        return m

    def _bank(self, s, addr):
        return addr >> s.bank_bits

    def _bank_bit(self, s, addr):
        """A flag a bank: the one ``addr`` lies in."""
        return Cat(*(self._bank(s, addr) == b for b in range(self.config.shape.banks)))

    def _range_banks(self, s, start, n):
        """The banks that words ``start .. start + n - 1`` touch (n >= 1, inside the pool), a flag each."""
        first, last = self._bank(s, start), self._bank(s, start + n - 1)
        return Cat(*((first <= b) & (b <= last) for b in range(self.config.shape.banks)))

    def _span(self, name):
        """A range of pool words as two registers, ``[lo, hi)``, one bit wider than an address."""
        end_bits = self.addr_bits + 1
        return Signal(end_bits, name=f"{name}_lo"), Signal(end_bits, name=f"{name}_hi")

    @staticmethod
    def _overlap(x, y):
        return (x[0] < y[1]) & (y[0] < x[1])

    def _registers(self, m, s):
        """The command being decoded (opcode, flags, count, the six argument words), the sticky error
        flags, a LOAD's progress, and what the running MATMUL and the store unit hold: their banks and
        ranges, latched in every cycle none runs (so in the one that starts it), so the dispatch decision
        enables one flip-flop, not all of these."""
        c, H, A = self.config, s.H, s.A
        opcode, flags, count = Signal(8), Signal(8), Signal(16)
        # the four addresses kept as pool word offsets (addr_bits) with a flag "fits in the pool's address
        # width": every range check and overlap then works on addr_bits-wide numbers, not on 32-bit ones
        args = [Signal(A, name=f"arg{n}") for n in range(4)] + [Signal(16, name="arg4"), Signal(32, name="arg5")]
        args_fit = [Signal(name=f"arg{n}_fits") for n in range(4)]
        arg_idx = Signal(range(7))
        err = Signal(4)
        m.d.comb += self.error.eq(err)
        idx = Signal(17)                        # pool word of a LOAD
        # and whether it is the LOAD's last, a flip-flop counted down beside it, so no add and compare
        # decide the next state
        ld_left, ld_last = Signal(16), Signal()
        sub = Signal(range(H + 1))              # host word within it
        word = Signal(self.word_bits)
        range_ok, shape_ok_r, addr_ok_r, bank_ok_r = Signal(), Signal(), Signal(), Signal()

        # the running MATMUL and the store unit: the banks and ranges each holds
        mm_running, mm_rbanks, mm_wbanks = Signal(), Signal(c.shape.banks), Signal(c.shape.banks)
        mm_spans = [self._span(n) for n in ("mm_a", "mm_w", "mm_p", "mm_o")]
        with m.If(self.mm_done):
            m.d.sync += mm_running.eq(0)
        st_busy, st_banks, st_span = Signal(), Signal(c.shape.banks), self._span("st")
        st_rd_left, st_tx_left = Signal(16), Signal(16)     # pool words still to read, to send
        st_rd_more = Signal()                               # st_rd_left != 0, as a flip-flop
        st_sub = Signal(range(H))
        m.d.comb += self.busy.eq(mm_running | st_busy)

        vars(s).update(opcode=opcode, flags=flags, count=count, args=args, args_fit=args_fit, arg_idx=arg_idx,
                       err=err, idx=idx, ld_left=ld_left, ld_last=ld_last, sub=sub, word=word, range_ok=range_ok,
                       shape_ok_r=shape_ok_r, addr_ok_r=addr_ok_r, bank_ok_r=bank_ok_r, mm_running=mm_running,
                       mm_rbanks=mm_rbanks, mm_wbanks=mm_wbanks, mm_spans=mm_spans, st_busy=st_busy,
                       st_banks=st_banks, st_span=st_span, st_rd_left=st_rd_left, st_tx_left=st_tx_left,
                       st_rd_more=st_rd_more, st_sub=st_sub)

    def _answers(self, m, s):
        """The answer words of SYNC (``STATUS``), INFO (``Info``) and COUNTERS (``Counters``), as
        ``proto.isa`` lays them out: ``emit_word`` is word ``emit_idx`` of answer ``emit_kind``."""
        c, err = self.config, s.err
        status = word_of(STATUS, errors=err, magic=STATUS_MAGIC)
        info = [Const(w, 32) for w in Info(ISA_VERSION, c.shape).pack()]
        cnt = [getattr(self, f"cnt_{name}")[half] for name in Counters._fields
               for half in (slice(0, 32), slice(32, 64))]
        emit_kind, emit_idx, emit_n = Signal(2), Signal(3), Signal(3)
        emit_word = Signal(32)
        with m.Switch(emit_kind):
            with m.Case(0):
                m.d.comb += emit_word.eq(status)
            with m.Case(1):
                m.d.comb += emit_word.eq(Mux(emit_idx == 0, info[0], Mux(emit_idx == 1, info[1], info[2])))
            with m.Default():
                with m.Switch(emit_idx):
                    for n, w in enumerate(cnt):
                        with m.Case(n):
                            m.d.comb += emit_word.eq(w)
        s.emit_kind, s.emit_idx, s.emit_n, s.emit_word = emit_kind, emit_idx, emit_n, emit_word

    def _matmul_checks(self, m, s, platform):
        """A MATMUL's arguments checked before dispatch: its shape (mode, M against ``acc_depth``, tile
        counts), each region inside the pool and one bank (the region sizes ``M x kt``, ``nt x kt x
        lanes``, ``nt x 9`` and ``nt x M x`` row words, computed in MEASURE through one registered 16 x 16
        multiplier, or digit-serially, and scaled in SCALE), its operands in banks apart; and the banks
        and ranges the command being dispatched (a MATMUL, or a LOAD or STORE: ``x_``) would use."""
        c, bank_bits = self.config, s.bank_bits
        args, args_fit, flags, count = s.args, s.args_fit, s.flags, s.count
        bank, bank_bit = partial(self._bank, s), partial(self._bank_bit, s)
        # MATMUL argument checks: each region inside one bank; A, W/P and O apart
        a, w, p, o = args[0], args[1], args[2], args[3]
        mm_m, kt, nt = args[4], args[5][TILES.bits("k_tiles")], args[5][TILES.bits("n_tiles")]
        mode = flags[:2]
        cont, hold = (flags[Chain(f).bit_length() - 1] for f in (Chain.CONTINUE, Chain.HOLD))
        # the sums a HOLD left in the accumulators: for the next MATMUL only (any MATMUL decoded, run or
        # dropped, replaces it), and only for a CONTINUE of the same M
        held, held_m = Signal(), Signal(16)
        mw = Signal(3)
        m.d.comb += mw.eq(mode_words(mode))

        def inside(n, extent):
            # address argument n and the extent from it inside the pool and one bank (an extent's
            # bits above the bank's width make it too long at once)
            start = args[n]
            return (args_fit[n] & (start < c.shape.pool_words) & (extent[bank_bits + 1:] == 0)
                    & (start[:bank_bits] + extent[:bank_bits + 1] <= c.shape.bank_words))

        # the extents of the four regions, registered in the MEASURE and SCALE cycles before DISPATCH, so no
        # multiply shares a cycle with a check; with the multiplies in logic (a small FPGA) each kept as its
        # low bank_bits + 1 bits and a flag "longer than that", all a range check needs (full width
        # elsewhere, which Verilator simulates faster)
        E = bank_bits + 1
        narrow = c.impl.serial_mul_bits is not None
        if narrow:
            ext_a, ext_w, ext_p, ext_o = (Signal(E + 1, name=f"ext_{n}") for n in "awpo")
        else:
            ext_a, ext_w = Signal(32, name="ext_a"), Signal(32 + (c.shape.lanes - 1).bit_length() + 1, name="ext_w")
            ext_p = Signal(16 + PARAM_WORDS_PER_LANE_GROUP.bit_length(), name="ext_p")
            ext_o = Signal(35, name="ext_o")

        def clip(value, big=0):
            return Cat(value[:E], big | value[E:].any()) if narrow else value
        measure_step = Signal(3)
        product = Signal(32 if c.impl.serial_mul_bits is None else E + 2)
        if c.impl.serial_mul_bits is None:
            # the operands picked into flip-flops, then multiplied inside a DSP block with registered
            # operands and product (on a full ECP5 the block is whichever one the array left, far from
            # this logic: every way into it and out of it starts and ends at a register)
            mul_a, mul_b = Signal(16), Signal(16)
            op_a, op_b = Signal(16, name="extent_op_a", reset_less=True), Signal(16, name="extent_op_b",
                                                                                   reset_less=True)
            m.d.sync += [op_a.eq(mul_a), op_b.eq(mul_b)]
            m.d.comb += product.eq(registered_product(m, platform, op_a, op_b, "extent_mul"))

        def store_extent(first, value):
            # the products, in order: ext_a = M x kt, ext_w = nt x kt, ext_o = nt x M (scaled in SCALE)
            with m.Switch(measure_step):
                for k, ext in enumerate((ext_a, ext_w, ext_o)):
                    with m.Case(first + k):
                        m.d.sync += ext.eq(clip(value))
                        if k == 2:
                            m.next = "SCALE"
        def times(value, constant):
            # a constant multiply as shifts and adds: as a `*` synthesis would give it a DSP block too
            return sum(value << k for k in range(constant.bit_length()) if constant >> k & 1)
        known_bits = (MODE_MASK | Chain.CONTINUE | Chain.HOLD).bit_length()
        shape_ok = ((mode <= Mode.INT32) & (flags[known_bits:] == 0) & (mm_m != 0)
                    & (mm_m <= c.shape.acc_depth) & (kt != 0) & (nt != 0) & (~(cont | hold) | (nt == 1))
                    & (~cont | (held & (held_m == mm_m))))
        addr_ok = (inside(0, ext_a) & inside(1, ext_w) & inside(2, ext_p) & inside(3, ext_o) & (o[:2] == 0))
        bank_ok = ((bank(a) != bank(w)) & (bank(a) != bank(p)) & (bank(o) != bank(a)) & (bank(o) != bank(w))
                   & (bank(o) != bank(p)))
        m.d.comb += [self.mm_a.eq(a), self.mm_w.eq(w), self.mm_p.eq(p), self.mm_o.eq(o), self.mm_m.eq(mm_m),
                     self.mm_k_tiles.eq(kt), self.mm_n_tiles.eq(nt), self.mm_mode.eq(mode),
                     self.mm_continue.eq(cont), self.mm_hold.eq(hold)]
        # the dispatching command's banks and ranges, and what it would clash with
        new_rbanks, new_wbanks = Signal(c.shape.banks), Signal(c.shape.banks)
        m.d.comb += [new_rbanks.eq(bank_bit(a) | bank_bit(w) | bank_bit(p)), new_wbanks.eq(bank_bit(o))]
        # (exact when addr_ok holds: the extents are then no longer than a bank)
        new_spans = [(x, x + ext[:bank_bits + 1]) for x, ext in ((a, ext_a), (w, ext_w), (p, ext_p), (o, ext_o))]
        x_banks = Signal(c.shape.banks)               # the LOAD/STORE being dispatched
        x_span = (args[0], args[0] + count)
        x_ends = []
        vars(s).update(ext_a=ext_a, ext_w=ext_w, ext_p=ext_p, ext_o=ext_o, clip=clip, times=times, narrow=narrow,
                       E=E, measure_step=measure_step, product=product, store_extent=store_extent, mw=mw,
                       kt=kt, nt=nt, mm_m=mm_m, shape_ok=shape_ok, hold=hold, held=held, held_m=held_m,
                       addr_ok=addr_ok, bank_ok=bank_ok,
                       new_rbanks=new_rbanks, new_wbanks=new_wbanks, new_spans=new_spans, x_banks=x_banks,
                       x_span=x_span, x_ends=x_ends)
        if c.impl.serial_mul_bits is None:
            s.mul_a, s.mul_b = mul_a, mul_b

    def _clashes(self, m, s):
        """What a dispatching command would clash with (docs/isa.md, "Ordering"): ``load_waits``,
        ``store_waits`` and ``matmul_waits``. With ``overlap`` the ranges' ends and the LOAD/STORE's banks
        are registered in SPANS, after the extents are final, and the clashes registered every cycle in
        CHECK and DISPATCH, so a cycle old where they are read: the dispatching command's ranges were
        final the cycle before, a running unit's ranges cannot change under it, and the store unit's next
        read only moves up, so a clash a cycle old is the clash now, or a cycle more of waiting. Without
        ``overlap`` one command runs at a time."""
        c, count, args = self.config, s.count, s.args
        bank, overlap = partial(self._bank, s), self._overlap
        x_banks, x_span, new_spans, x_ends = s.x_banks, s.x_span, s.new_spans, s.x_ends
        mm_running, mm_rbanks, mm_wbanks, mm_spans = s.mm_running, s.mm_rbanks, s.mm_wbanks, s.mm_spans
        st_busy, st_banks, st_span = s.st_busy, s.st_banks, s.st_span
        new_rbanks, new_wbanks = s.new_rbanks, s.new_wbanks
        end_bits = self.addr_bits + 1
        if c.impl.overlap:
            # the ends of the ranges, and the LOAD/STORE's banks, registered in a cycle of their own (SPANS,
            # after the extents are final) before the clashes, the LOAD/STORE's ends before that (in
            # MEASURE), so no adder chains into a comparator
            ends = [Signal(end_bits, name=f"new_{n}_hi") for n in "awpo"]
            x_end, x_last = Signal(len(x_span[1]), name="x_hi"), Signal(len(x_span[1]), name="x_last")
            x_ends = [x_end.eq(x_span[1]), x_last.eq(x_span[1] - 1)]
            spans = [x_banks.eq(Cat(*((bank(args[0]) <= b) & (b <= bank(x_last))
                                      for b in range(c.shape.banks))))]
            spans += [e.eq(hi) for e, (lo, hi) in zip(ends, new_spans)]
            new_spans = [(lo, e) for e, (lo, hi) in zip(ends, new_spans)]
            x_span = (args[0], x_end)
        else:
            m.d.comb += x_banks.eq(self._range_banks(s, args[0], count))
        with m.If(~mm_running):
            m.d.sync += [mm_rbanks.eq(new_rbanks), mm_wbanks.eq(new_wbanks)]
            m.d.sync += [x.eq(y) for held, new in zip(mm_spans, new_spans) for x, y in zip(held, new)]
        if c.impl.overlap:
            # the clashes of ranges and banks registered in CHECK and DISPATCH, where they are read, so a
            # cycle old in DISPATCH (see above); a unit running now was running then (only DISPATCH starts
            # one, and then leaves)
            load_mm, load_st, store_mm, matmul_st = (Signal(name=n) for n in
                                                     ("load_mm_clash", "load_st_clash", "store_mm_clash",
                                                      "matmul_st_clash"))
            clashes = [load_mm.eq((x_banks & mm_wbanks).any() | overlap(x_span, mm_spans[0])
                                  | overlap(x_span, mm_spans[1]) | overlap(x_span, mm_spans[2])),
                       load_st.eq(overlap(x_span, st_span)),
                       store_mm.eq((x_banks & mm_rbanks).any() | overlap(x_span, mm_spans[3])),
                       matmul_st.eq((new_rbanks & st_banks).any() | overlap(new_spans[3], st_span))]
            load_waits = (mm_running & load_mm) | (st_busy & load_st)
            store_waits = st_busy | (mm_running & store_mm)
            matmul_waits = mm_running | (st_busy & matmul_st)
        else:
            # one command at a time: none of the bank and range bookkeeping is used (synthesis removes it)
            load_waits = store_waits = matmul_waits = mm_running | st_busy
            clashes = []

        vars(s).update(spans=spans if c.impl.overlap else [], clashes=clashes, load_waits=load_waits,
                       store_waits=store_waits, matmul_waits=matmul_waits, x_span=x_span, new_spans=new_spans,
                       x_ends=x_ends)

    def _store_unit(self, m, s):
        """The store unit: a STORE's pool words read ahead into a FIFO (``3 + pool_read_latency`` words;
        one with no ``overlap``, behind a link far slower than the pool), so ``o`` sends a host word every
        cycle the host takes one. A read is issued while the FIFO has room for it beside the reads in
        flight, its word landing ``pool_read_latency`` cycles later."""
        c, H = self.config, s.H
        st_busy, st_span, st_rd_left, st_tx_left = s.st_busy, s.st_span, s.st_rd_left, s.st_tx_left
        st_rd_more, st_sub = s.st_rd_more, s.st_sub
        fifo_depth = 3 + c.impl.pool_read_latency if c.impl.overlap else 1
        m.submodules.st_fifo = st_fifo = SyncFIFO(width=self.word_bits, depth=fifo_depth)
        # the reads of the last pool_read_latency cycles: the oldest one's word lands in the FIFO now
        st_inflight = [Signal(name=f"st_inflight{k}") for k in range(c.impl.pool_read_latency)]
        m.d.sync += [x.eq(y) for x, y in zip(st_inflight, [self.rd_en, *st_inflight])]
        m.d.comb += [st_fifo.w_data.eq(self.rd_data), st_fifo.w_en.eq(st_inflight[-1])]
        # the FIFO's room for more reads: its free words less the reads in flight, counted as they change,
        # so no sum of the level and the in-flight flags decides a read
        room = Signal(range(fifo_depth + 1), init=max(1, fifo_depth - 1))
        m.d.sync += room.eq(room - self.rd_en + st_fifo.r_en)
        m.d.comb += self.rd_addr.eq(st_span[0])     # only the enable decides, as for the engine's reads
        # "more to read" is a flip-flop, compared a cycle early on the count it replaces
        with m.If(st_busy & st_rd_more & (room != 0)):
            m.d.comb += self.rd_en.eq(1)
            m.d.sync += [st_span[0].eq(st_span[0] + 1), st_rd_left.eq(st_rd_left - 1),
                         st_rd_more.eq(st_rd_left != 1)]
        with m.If(st_fifo.r_rdy):
            st_out = st_fifo.r_data.word_select(st_sub, 32) if H > 1 else st_fifo.r_data
            m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(st_out)]
            with m.If(self.o.ready):
                m.d.sync += st_sub.eq(st_sub + 1)
                with m.If(st_sub == H - 1):
                    m.d.comb += st_fifo.r_en.eq(1)
                    m.d.sync += [st_sub.eq(0), st_tx_left.eq(st_tx_left - 1)]
                    with m.If(st_tx_left == 1):
                        m.d.sync += st_busy.eq(0)


    def _decoder(self, m, s):
        """The decoder's FSM: HEADER, ARGS (the argument words), MEASURE and SCALE (a MATMUL's region
        sizes), SPANS (with ``overlap``: the ranges' ends), CHECK (the checks and clashes registered),
        DISPATCH (an error flag, or the command started once nothing it clashes with runs), LOAD (its data,
        a host word a cycle), DRAIN (SYNC, COUNTERS and INFO wait for both units), EMIT (the answer)."""
        c, H, A = self.config, s.H, s.A
        opcode, flags, count, args, args_fit, arg_idx = s.opcode, s.flags, s.count, s.args, s.args_fit, s.arg_idx
        err, idx, ld_left, ld_last, sub, word = s.err, s.idx, s.ld_left, s.ld_last, s.sub, s.word
        range_ok, shape_ok_r, addr_ok_r, bank_ok_r = s.range_ok, s.shape_ok_r, s.addr_ok_r, s.bank_ok_r
        emit_kind, emit_idx, emit_n, emit_word = s.emit_kind, s.emit_idx, s.emit_n, s.emit_word
        ext_p, ext_w, ext_o, clip, times, narrow, E = s.ext_p, s.ext_w, s.ext_o, s.clip, s.times, s.narrow, s.E
        measure_step, product, store_extent, mw = s.measure_step, s.product, s.store_extent, s.mw
        kt, nt, mm_m, x_ends, x_banks, x_span = s.kt, s.nt, s.mm_m, s.x_ends, s.x_banks, s.x_span
        mm_running, st_busy, st_banks, st_span = s.mm_running, s.st_busy, s.st_banks, s.st_span
        st_rd_left, st_tx_left, st_rd_more = s.st_rd_left, s.st_tx_left, s.st_rd_more
        spans, clashes = s.spans, s.clashes
        load_waits, store_waits, matmul_waits = s.load_waits, s.store_waits, s.matmul_waits
        if c.impl.serial_mul_bits is None:
            mul_a, mul_b = s.mul_a, s.mul_b
        checks = [range_ok.eq(args_fit[0] & (args[0] + count <= c.shape.pool_words)), shape_ok_r.eq(s.shape_ok),
                  addr_ok_r.eq(s.addr_ok), bank_ok_r.eq(s.bank_ok)]
        with m.FSM():
            with m.State("HEADER"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    op = self.i.payload[HEADER.bits("opcode")]
                    m.d.sync += [opcode.eq(op), flags.eq(self.i.payload[HEADER.bits("flags")]),
                                 count.eq(self.i.payload[HEADER.bits("count")]),
                                 arg_idx.eq(0), emit_idx.eq(0)]
                    with m.Switch(op):
                        with m.Case(Opcode.NOP):
                            pass
                        with m.Case(Opcode.LOAD, Opcode.STORE, Opcode.MATMUL):
                            m.next = "ARGS"
                        with m.Case(Opcode.SYNC):
                            m.d.sync += [emit_kind.eq(0), emit_n.eq(1)]
                            m.next = "DRAIN"
                        with m.Case(Opcode.INFO):
                            m.d.sync += [emit_kind.eq(1), emit_n.eq(Info.WORDS)]
                            m.next = "DRAIN"
                        with m.Case(Opcode.COUNTERS):
                            m.d.sync += [emit_kind.eq(2), emit_n.eq(Counters.WORDS)]
                            m.next = "DRAIN"
                        with m.Default():
                            m.d.sync += err.eq(err | Error.OPCODE)
            with m.State("ARGS"):
                m.d.comb += self.i.ready.eq(1)
                n_args = Mux(opcode == Opcode.MATMUL, ARG_WORDS[Opcode.MATMUL], 1)
                with m.If(self.i.valid):
                    with m.Switch(arg_idx):
                        for n in range(6):
                            with m.Case(n):
                                m.d.sync += args[n].eq(self.i.payload)
                                if n < 4:
                                    m.d.sync += args_fit[n].eq(self.i.payload[A:] == 0)
                    m.d.sync += arg_idx.eq(arg_idx + 1)
                    with m.If(arg_idx + 1 == n_args):
                        m.d.sync += [idx.eq(0), sub.eq(0), measure_step.eq(0), ld_left.eq(count),
                                     ld_last.eq(count == 1)]
                        m.next = "MEASURE"
            with m.State("MEASURE"):
                m.d.sync += ext_p.eq(clip(times(nt, PARAM_WORDS_PER_LANE_GROUP)))
                m.d.sync += x_ends
                if c.impl.serial_mul_bits is None:
                    # the three products of two arguments through one 16 x 16 multiplier with registered
                    # operands and product, one a cycle, three cycles after their operands are picked (six
                    # cycles a MATMUL cost nothing); their scaling after
                    m.d.comb += [mul_a.eq(Mux(measure_step == 0, kt, nt)), mul_b.eq(Mux(measure_step == 1, kt, mm_m))]
                    m.d.sync += measure_step.eq(measure_step + 1)
                    store_extent(3, product)
                else:
                    # digit-serial, most significant digit first: acc = (acc << d) + a * digit, 16 / d
                    # cycles a product, in logic (the DSP blocks all went to the array)
                    d = c.impl.serial_mul_bits
                    n_digits = 16 // d
                    digit_idx = Signal(range(n_digits), init=n_digits - 1)     # counts down
                    # only the low E + 1 bits of a product are kept, and a sticky flag for any above them
                    # (an extent that long is refused, whatever it is): an adder of E + 1 + d bits (11 on
                    # the iCEBreaker), not a 32-bit one. Exact: once the sum reaches 2**(E + 1) it only
                    # grows; below that the kept bits are all of it.
                    op_a = Mux(measure_step == 0, kt, nt)
                    op_b = Mux(measure_step == 1, kt, mm_m)
                    digit = op_b.word_select(digit_idx, d)
                    first = digit_idx == n_digits - 1
                    kept, big = product[:E + 1], product[E + 1]
                    acc = Signal(E + 1 + d + 1)
                    m.d.comb += acc.eq(Mux(first, 0, kept << d) + op_a[:E + 1] * digit)
                    m.d.sync += [product.eq(Cat(acc[:E + 1], ~first & big | acc[E + 1:].any()
                                                | (op_a[E + 1:].any() & digit.any()))),
                                 digit_idx.eq(digit_idx - 1)]
                    with m.If(digit_idx == 0):
                        m.d.sync += [digit_idx.eq(n_digits - 1), measure_step.eq(measure_step + 1)]
                    # a product is stored from its register as the next one starts, so the sum and the
                    # extent's range flag do not share a cycle
                    with m.If((digit_idx == n_digits - 1) & (measure_step != 0)):
                        store_extent(1, product)
                        with m.If(measure_step == 3):
                            m.d.sync += digit_idx.eq(n_digits - 1)      # ready for the next MATMUL
            with m.State("SCALE"):
                if narrow:
                    scaled_o = Mux(mw == 1, ext_o[:E], Mux(mw == 2, ext_o[:E] << 1, ext_o[:E] << 2))
                    m.d.sync += [ext_w.eq(clip(times(ext_w[:E], c.shape.lanes), ext_w[E])),
                                 ext_o.eq(clip(scaled_o, ext_o[E]))]
                else:
                    m.d.sync += [ext_w.eq(times(ext_w, c.shape.lanes)),
                                 ext_o.eq(Mux(mw == 1, ext_o, Mux(mw == 2, ext_o << 1, ext_o << 2)))]
                m.next = "SPANS" if c.impl.overlap else "CHECK"
            if c.impl.overlap:
                with m.State("SPANS"):
                    m.d.sync += spans
                    m.next = "CHECK"
            with m.State("CHECK"):
                # the checks registered, so none runs on into the engine's start, and the clashes with
                # the final extents
                m.d.sync += checks + clashes
                m.next = "DISPATCH"
            with m.State("DISPATCH"):
                m.d.sync += clashes
                with m.Switch(opcode):
                    with m.Case(Opcode.LOAD):
                        with m.If(~range_ok):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                        with m.If(count == 0):
                            m.next = "HEADER"
                        with m.Elif(~range_ok):
                            m.d.sync += flags.eq(0)         # flags reused: 1 = write the data
                            m.next = "LOAD"
                        with m.Elif(~load_waits):
                            m.d.sync += flags.eq(1)
                            m.next = "LOAD"
                    with m.Case(Opcode.STORE):
                        with m.If(~range_ok):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                            m.next = "HEADER"
                        with m.Elif(count == 0):
                            m.next = "HEADER"
                        with m.Elif(~store_waits):
                            m.d.sync += [st_busy.eq(1), st_banks.eq(x_banks), st_span[0].eq(x_span[0]),
                                         st_span[1].eq(x_span[1]), st_rd_left.eq(count), st_tx_left.eq(count),
                                         st_rd_more.eq(1)]      # (count is not 0 here)
                            m.next = "HEADER"
                    with m.Default():      # MATMUL
                        with m.If(~shape_ok_r | ~addr_ok_r | ~bank_ok_r | ~matmul_waits):
                            m.d.sync += [s.held.eq(s.hold & shape_ok_r & addr_ok_r & bank_ok_r),
                                         s.held_m.eq(mm_m)]
                        with m.If(~shape_ok_r):
                            m.d.sync += err.eq(err | Error.SHAPE)
                            m.next = "HEADER"
                        with m.Elif(~addr_ok_r):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                            m.next = "HEADER"
                        with m.Elif(~bank_ok_r):
                            m.d.sync += err.eq(err | Error.BANK)
                            m.next = "HEADER"
                        with m.Elif(~matmul_waits):
                            m.d.comb += self.mm_start.eq(1)
                            m.d.sync += mm_running.eq(1)
                            m.next = "HEADER"
            with m.State("LOAD"):
                # host words shift in from the top, so the first lands in the low bits (lane 0)
                assembled = Cat(word[32:], self.i.payload) if H > 1 else self.i.payload
                m.d.comb += [self.i.ready.eq(1), self.wr_addr.eq(args[0] + idx), self.wr_data.eq(assembled)]
                with m.If(self.i.valid):
                    m.d.sync += [word.eq(assembled), sub.eq(sub + 1)]
                    with m.If(sub + 1 == H):
                        m.d.comb += self.wr_en.eq(flags[0])
                        m.d.sync += [sub.eq(0), idx.eq(idx + 1), ld_left.eq(ld_left - 1), ld_last.eq(ld_left == 2)]
                        with m.If(ld_last):
                            m.next = "HEADER"
            with m.State("DRAIN"):
                # answers come after everything before them: the running MATMUL and the last STORE
                with m.If(~mm_running & ~st_busy):
                    m.next = "EMIT"
            with m.State("EMIT"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(emit_word)]
                with m.If(self.o.ready):
                    m.d.sync += emit_idx.eq(emit_idx + 1)
                    with m.If(emit_idx + 1 == emit_n):
                        with m.If(emit_kind == 0):
                            m.d.sync += err.eq(0)        # SYNC reports, then clears
                        m.next = "HEADER"
        return m
