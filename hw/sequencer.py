"""The instruction sequencer: decodes the host stream, moves data in and out of the pool, starts MATMULs."""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .engine import mode_words
from .isa import ARG_WORDS, ISA_VERSION, PARAM_WORDS_PER_LANE_GROUP, STATUS_MAGIC, Error, Mode, Opcode
from .mac import registered_product

__all__ = ["Sequencer"]


class Sequencer(wiring.Component):
    """Decode the host's instruction stream (see ``hw.isa`` and docs/isa.md).

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

    The store unit reads up to ``2 + config.pool_read_latency`` words ahead, so a STORE sends one host word
    every cycle the host takes one. With ``config.overlap`` False every command waits for both units to be
    idle, and the store unit reads one word ahead. Pool access: ``rd_*`` (the store unit; data
    ``config.pool_read_latency`` cycles after ``rd_en``) and ``wr_*`` (LOAD), global word addresses.
    ``busy``: the store unit or a MATMUL is running.
    """

    def __init__(self, config):
        self.config = c = config
        self.word_bits = 8 * c.lanes
        self.addr_bits = max(1, (c.pool_words - 1).bit_length())
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
            "mm_mode": Out(2),
            "cnt_busy": In(64), "cnt_stalled": In(64), "cnt_macs": In(64),
        })

    def elaborate(self, platform):
        m = Module()
        c = self.config
        H = c.lanes // 4                        # host words per pool word
        bank_bits = (c.bank_words - 1).bit_length()

        opcode, flags, count = Signal(8), Signal(8), Signal(16)
        # the four addresses kept as pool word offsets (addr_bits) with a flag "fits in the pool's address
        # width": every range check and overlap then works on addr_bits-wide numbers, not on 32-bit ones
        A = self.addr_bits
        args = [Signal(A, name=f"arg{n}") for n in range(4)] + [Signal(16, name="arg4"), Signal(32, name="arg5")]
        args_fit = [Signal(name=f"arg{n}_fits") for n in range(4)]
        arg_idx = Signal(range(7))
        err = Signal(4)
        m.d.comb += self.error.eq(err)
        idx = Signal(17)                        # pool word of a LOAD
        # (and whether it is the LOAD's last, a flip-flop counted down beside it: idx + 1 == count, an add
        # and a compare on into the state register, was the UP5K build's critical path)
        ld_left, ld_last = Signal(16), Signal()
        sub = Signal(range(H + 1))              # host word within it
        word = Signal(self.word_bits)
        range_ok, shape_ok_r, addr_ok_r, bank_ok_r = Signal(), Signal(), Signal(), Signal()

        def bank(addr):
            return addr >> bank_bits

        def bank_bit(addr):
            return Cat(*(bank(addr) == b for b in range(c.banks)))

        def range_banks(start, n):
            """The banks that words ``start .. start + n - 1`` touch (n >= 1, inside the pool)."""
            first, last = bank(start), bank(start + n - 1)
            return Cat(*((first <= b) & (b <= last) for b in range(c.banks)))

        # --- the running MATMUL and the store unit: the banks and ranges each holds ---------------------
        end_bits = self.addr_bits + 1

        def span(name):
            return Signal(end_bits, name=f"{name}_lo"), Signal(end_bits, name=f"{name}_hi")

        def overlap(x, y):
            return (x[0] < y[1]) & (y[0] < x[1])

        mm_running, mm_rbanks, mm_wbanks = Signal(), Signal(c.banks), Signal(c.banks)
        mm_spans = [span(n) for n in ("mm_a", "mm_w", "mm_p", "mm_o")]
        with m.If(self.mm_done):
            m.d.sync += mm_running.eq(0)
        # the banks and ranges of the MATMUL being dispatched, latched in every cycle none runs (so in the
        # one that starts it): the dispatch decision then enables one flip-flop, not all of these
        st_busy, st_banks, st_span = Signal(), Signal(c.banks), span("st")
        st_rd_left, st_tx_left = Signal(16), Signal(16)     # pool words still to read, to send
        st_rd_more = Signal()                               # st_rd_left != 0, as a flip-flop
        st_sub = Signal(range(H))
        m.d.comb += self.busy.eq(mm_running | st_busy)

        # the answers of SYNC / COUNTERS / INFO
        status = Cat(err, Const(0, 20), Const(STATUS_MAGIC, 8))
        info = [Cat(Const(c.banks, 8), Const(c.lanes, 8), Const(c.lanes, 8), Const(ISA_VERSION, 8)),
                Const(c.bank_words, 32), Const(c.acc_depth, 32)]
        cnt = [self.cnt_busy[:32], self.cnt_busy[32:], self.cnt_stalled[:32], self.cnt_stalled[32:],
               self.cnt_macs[:32], self.cnt_macs[32:]]
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

        # MATMUL argument checks: each region inside one bank; A, W/P and O apart
        a, w, p, o = args[0], args[1], args[2], args[3]
        mm_m, kt, nt = args[4], args[5][:16], args[5][16:]
        mode = flags[:2]
        mw = Signal(3)
        m.d.comb += mw.eq(mode_words(mode))

        def inside(n, extent):
            # address argument n and the extent from it inside the pool and one bank (an extent's
            # bits above the bank's width make it too long at once)
            start = args[n]
            return (args_fit[n] & (start < c.pool_words) & (extent[bank_bits + 1:] == 0)
                    & (start[:bank_bits] + extent[:bank_bits + 1] <= c.bank_words))

        # the extents of the four regions, registered in the MEASURE and SCALE cycles before DISPATCH: the
        # products are DSP multiplies, and checking them in the same cycle was the design's critical path
        # with the multiplies in logic (a small FPGA), each kept as its low bank_bits + 1 bits and a flag
        # "longer than that", all a range check needs (full width elsewhere: the narrow form cost the
        # simulated 16 x 16 device 2-5% of its speed)
        E = bank_bits + 1
        narrow = c.serial_mul_bits is not None
        if narrow:
            ext_a, ext_w, ext_p, ext_o = (Signal(E + 1, name=f"ext_{n}") for n in "awpo")
        else:
            ext_a, ext_w = Signal(32, name="ext_a"), Signal(32 + (c.lanes - 1).bit_length() + 1, name="ext_w")
            ext_p = Signal(16 + PARAM_WORDS_PER_LANE_GROUP.bit_length(), name="ext_p")
            ext_o = Signal(35, name="ext_o")

        def clip(value, big=0):
            return Cat(value[:E], big | value[E:].any()) if narrow else value
        measure_step = Signal(3)
        product = Signal(32 if c.serial_mul_bits is None else E + 2)
        if c.serial_mul_bits is None:
            # operands registered, then the product, before it is stored: on a full ECP5 its DSP block is
            # whichever one the array left, far from this logic (operands -> multiply -> extent in one
            # cycle was the 12 x 12's critical path, then the routing into the block and out of it; then
            # the operand multiplexers on into the block's input registers: they are picked into flip-flops
            # first, a cycle before)
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
        shape_ok = ((flags <= Mode.INT32) & (mm_m != 0) & (mm_m <= c.acc_depth) & (kt != 0) & (nt != 0))
        addr_ok = (inside(0, ext_a) & inside(1, ext_w) & inside(2, ext_p) & inside(3, ext_o) & (o[:2] == 0))
        bank_ok = ((bank(a) != bank(w)) & (bank(a) != bank(p)) & (bank(o) != bank(a)) & (bank(o) != bank(w))
                   & (bank(o) != bank(p)))
        m.d.comb += [self.mm_a.eq(a), self.mm_w.eq(w), self.mm_p.eq(p), self.mm_o.eq(o), self.mm_m.eq(mm_m),
                     self.mm_k_tiles.eq(kt), self.mm_n_tiles.eq(nt), self.mm_mode.eq(mode)]
        # the dispatching command's banks and ranges, and what it would clash with
        new_rbanks, new_wbanks = Signal(c.banks), Signal(c.banks)
        m.d.comb += [new_rbanks.eq(bank_bit(a) | bank_bit(w) | bank_bit(p)), new_wbanks.eq(bank_bit(o))]
        # (exact when addr_ok holds: the extents are then no longer than a bank)
        new_spans = [(x, x + ext[:bank_bits + 1]) for x, ext in ((a, ext_a), (w, ext_w), (p, ext_p), (o, ext_o))]
        x_banks = Signal(c.banks)               # the LOAD/STORE being dispatched
        x_span = (args[0], args[0] + count)
        x_ends = []
        if c.overlap:
            # the ends of the ranges, and the LOAD/STORE's banks, registered in a cycle of their own (SPANS,
            # after the extents are final) before the clashes, the LOAD/STORE's ends before that (in
            # MEASURE): the adders chained into the comparators were the 12 x 12's critical path at 100 MHz
            ends = [Signal(end_bits, name=f"new_{n}_hi") for n in "awpo"]
            x_end, x_last = Signal(len(x_span[1]), name="x_hi"), Signal(len(x_span[1]), name="x_last")
            x_ends = [x_end.eq(x_span[1]), x_last.eq(x_span[1] - 1)]
            spans = [x_banks.eq(Cat(*((bank(args[0]) <= b) & (b <= bank(x_last)) for b in range(c.banks))))]
            spans += [e.eq(hi) for e, (lo, hi) in zip(ends, new_spans)]
            new_spans = [(lo, e) for e, (lo, hi) in zip(ends, new_spans)]
            x_span = (args[0], x_end)
        else:
            m.d.comb += x_banks.eq(range_banks(args[0], count))
        with m.If(~mm_running):
            m.d.sync += [mm_rbanks.eq(new_rbanks), mm_wbanks.eq(new_wbanks)]
            m.d.sync += [x.eq(y) for held, new in zip(mm_spans, new_spans) for x, y in zip(held, new)]
        if c.overlap:
            # the clashes of ranges and banks registered every cycle, so a cycle old in DISPATCH (the
            # comparators chained on into the store unit's registers were the ECP5 12 x 12's critical
            # path). The dispatching command's ranges were final the cycle before (CHECK); a unit running
            # now was running then (only DISPATCH starts one, and then leaves), with the same ranges and
            # banks, except the store unit's next read, which only moves up: a clash a cycle old is the
            # clash now, or (the store's read just past the range) a cycle more of waiting. (Registered
            # in CHECK and DISPATCH only, where they are read: every cycle cost the simulated 8 x 8 3%.)
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
            # one command at a time: none of the bank and range bookkeeping above is used (and synthesis
            # removes it)
            load_waits = store_waits = matmul_waits = mm_running | st_busy
            clashes = []

        # --- the store unit: reads run ahead into a small FIFO, so the stream sends a word every cycle ----
        # (without overlap, nothing else happens while a STORE runs, behind a link far slower than the
        # pool: one word read ahead is enough)
        # (a read more in flight with a pool read latency of 2: one more FIFO word keeps a word a cycle)
        fifo_depth = 3 + c.pool_read_latency if c.overlap else 1
        m.submodules.st_fifo = st_fifo = SyncFIFO(width=self.word_bits, depth=fifo_depth)
        # the reads of the last pool_read_latency cycles: the oldest one's word lands in the FIFO now
        st_inflight = [Signal(name=f"st_inflight{k}") for k in range(c.pool_read_latency)]
        m.d.sync += [x.eq(y) for x, y in zip(st_inflight, [self.rd_en, *st_inflight])]
        m.d.comb += [st_fifo.w_data.eq(self.rd_data), st_fifo.w_en.eq(st_inflight[-1])]
        # the FIFO's room for more reads: its free words less the reads in flight, counted as they change
        # (the FIFO's level plus the in-flight flags, summed and compared, then on into the enables of the
        # read address and count, was a path of the ECP5 12 x 12 at 100 MHz)
        room = Signal(range(fifo_depth + 1), init=max(1, fifo_depth - 1))
        m.d.sync += room.eq(room - self.rd_en + st_fifo.r_en)
        m.d.comb += self.rd_addr.eq(st_span[0])     # (only the enable decides: see the engine's reads)
        # (the 16-bit count's compare, on into the pool's read-address multiplexers, was a path of the
        # ECP5 12 x 12 at 100 MHz: the compare is a cycle early, on the count it replaces)
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

        checks = [range_ok.eq(args_fit[0] & (args[0] + count <= c.pool_words)), shape_ok_r.eq(shape_ok),
                  addr_ok_r.eq(addr_ok), bank_ok_r.eq(bank_ok)]
        with m.FSM():
            with m.State("HEADER"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    op = self.i.payload[24:]
                    m.d.sync += [opcode.eq(op), flags.eq(self.i.payload[16:24]), count.eq(self.i.payload[:16]),
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
                            m.d.sync += [emit_kind.eq(1), emit_n.eq(3)]
                            m.next = "DRAIN"
                        with m.Case(Opcode.COUNTERS):
                            m.d.sync += [emit_kind.eq(2), emit_n.eq(6)]
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
                if c.serial_mul_bits is None:
                    # the three products of two arguments through one 16 x 16 multiplier with registered
                    # operands and product, one a cycle, three cycles after their operands are picked (a
                    # small FPGA has few multipliers; six cycles per MATMUL cost nothing); their scaling after
                    m.d.comb += [mul_a.eq(Mux(measure_step == 0, kt, nt)), mul_b.eq(Mux(measure_step == 1, kt, mm_m))]
                    m.d.sync += measure_step.eq(measure_step + 1)
                    store_extent(3, product)
                else:
                    # digit-serial, most significant digit first: acc = (acc << d) + a * digit, 16 / d
                    # cycles a product, in logic (the DSP blocks all went to the array)
                    d = c.serial_mul_bits
                    n_digits = 16 // d
                    digit_idx = Signal(range(n_digits), init=n_digits - 1)     # counts down
                    # only the low E + 1 bits of a product are kept, and a sticky flag for any above them
                    # (an extent that long is refused, whatever it is): an adder of E + 1 + d bits (11 on
                    # the iCEBreaker), not a 32-bit one, which was the UP5K build's critical path. Exact:
                    # once the sum reaches 2**(E + 1) it only grows; below that the kept bits are all of it.
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
                    # a product is stored from its register as the next one starts (the sum and the
                    # extent's range flag in one cycle were the iCE40 build's critical path)
                    with m.If((digit_idx == n_digits - 1) & (measure_step != 0)):
                        store_extent(1, product)
                        with m.If(measure_step == 3):
                            m.d.sync += digit_idx.eq(n_digits - 1)      # ready for the next MATMUL
            with m.State("SCALE"):
                if narrow:
                    scaled_o = Mux(mw == 1, ext_o[:E], Mux(mw == 2, ext_o[:E] << 1, ext_o[:E] << 2))
                    m.d.sync += [ext_w.eq(clip(times(ext_w[:E], c.lanes), ext_w[E])),
                                 ext_o.eq(clip(scaled_o, ext_o[E]))]
                else:
                    m.d.sync += [ext_w.eq(times(ext_w, c.lanes)),
                                 ext_o.eq(Mux(mw == 1, ext_o, Mux(mw == 2, ext_o << 1, ext_o << 2)))]
                m.next = "SPANS" if c.overlap else "CHECK"
            if c.overlap:
                with m.State("SPANS"):
                    m.d.sync += spans
                    m.next = "CHECK"
            with m.State("CHECK"):
                # the checks registered (from the arguments through them into the engine's start in one
                # cycle was the UP5K build's critical path), and the clashes with the final extents
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
