"""The instruction sequencer: decodes the host stream, moves data in and out of the pool, starts MATMULs."""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .engine import mode_words
from .isa import ARG_WORDS, ISA_VERSION, PARAM_WORDS_PER_LANE_GROUP, STATUS_MAGIC, Error, Mode, Opcode

__all__ = ["Sequencer"]


class Sequencer(wiring.Component):
    """Decode the host's instruction stream (see ``hw.isa`` and docs/isa.md).

    ``i`` takes 32-bit words; ``o`` gives the answers of STORE, SYNC, COUNTERS and INFO. Instructions run
    in order; a MATMUL holds the stream until the engine is done. Every bad command sets a sticky flag in
    ``error`` and is dropped whole — an unknown opcode is one word; a LOAD with a bad range still
    consumes (and discards) the data its header announced; a bad STORE answers nothing; a bad MATMUL does
    not run — and decoding goes on. ``o`` honours backpressure; ``i`` is never read faster than one word
    a cycle.

    Pool access for LOAD/STORE: ``rd_*`` (data one cycle after ``rd_en``) and ``wr_*``, global word
    addresses. MATMUL: ``mm_start`` with the checked arguments, then wait for ``mm_done``.
    """

    def __init__(self, config):
        self.config = c = config
        self.word_bits = 8 * c.lanes
        self.addr_bits = max(1, (c.pool_words - 1).bit_length())
        super().__init__({
            "i": In(stream.Signature(32)),
            "o": Out(stream.Signature(32)),
            "error": Out(4),
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
        args = [Signal(32, name=f"arg{n}") for n in range(6)]
        arg_idx = Signal(range(7))
        err = Signal(4)
        m.d.comb += self.error.eq(err)
        idx = Signal(17)                        # pool word of a LOAD/STORE
        sub = Signal(range(H + 1))              # host word within it
        word = Signal(self.word_bits)
        range_ok = Signal()

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
        mm_m, kt, nt = args[4][:16], args[5][:16], args[5][16:]
        mode = flags[:2]
        mw = Signal(3)
        m.d.comb += mw.eq(mode_words(mode))

        def inside(start, extent):
            return (start < c.pool_words) & ((start & (c.bank_words - 1)) + extent <= c.bank_words)

        def bank(addr):
            return addr >> bank_bits
        shape_ok = ((flags <= Mode.INT32) & (mm_m != 0) & (mm_m <= c.acc_depth) & (kt != 0) & (nt != 0))
        addr_ok = (inside(a, kt * mm_m) & inside(w, nt * kt * c.lanes) & inside(p, nt * PARAM_WORDS_PER_LANE_GROUP)
                   & inside(o, nt * mm_m * mw) & (o[:2] == 0))
        bank_ok = ((bank(a) != bank(w)) & (bank(a) != bank(p)) & (bank(o) != bank(a)) & (bank(o) != bank(w))
                   & (bank(o) != bank(p)))
        m.d.comb += [self.mm_a.eq(a), self.mm_w.eq(w), self.mm_p.eq(p), self.mm_o.eq(o), self.mm_m.eq(mm_m),
                     self.mm_k_tiles.eq(kt), self.mm_n_tiles.eq(nt), self.mm_mode.eq(mode)]

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
                            m.next = "EMIT"
                        with m.Case(Opcode.INFO):
                            m.d.sync += [emit_kind.eq(1), emit_n.eq(3)]
                            m.next = "EMIT"
                        with m.Case(Opcode.COUNTERS):
                            m.d.sync += [emit_kind.eq(2), emit_n.eq(6)]
                            m.next = "EMIT"
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
                    m.d.sync += arg_idx.eq(arg_idx + 1)
                    with m.If(arg_idx + 1 == n_args):
                        m.d.sync += [idx.eq(0), sub.eq(0)]
                        m.next = "DISPATCH"
            with m.State("DISPATCH"):
                m.d.comb += range_ok.eq(args[0] + count <= c.pool_words)
                with m.Switch(opcode):
                    with m.Case(Opcode.LOAD):
                        with m.If(~range_ok):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                        m.d.sync += flags.eq(range_ok)          # reused: 1 = write the data
                        with m.If(count == 0):
                            m.next = "HEADER"
                        with m.Else():
                            m.next = "LOAD"
                    with m.Case(Opcode.STORE):
                        with m.If(~range_ok):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                            m.next = "HEADER"
                        with m.Elif(count == 0):
                            m.next = "HEADER"
                        with m.Else():
                            m.next = "STORE_READ"
                    with m.Default():      # MATMUL
                        with m.If(~shape_ok):
                            m.d.sync += err.eq(err | Error.SHAPE)
                            m.next = "HEADER"
                        with m.Elif(~addr_ok):
                            m.d.sync += err.eq(err | Error.ADDRESS)
                            m.next = "HEADER"
                        with m.Elif(~bank_ok):
                            m.d.sync += err.eq(err | Error.BANK)
                            m.next = "HEADER"
                        with m.Else():
                            m.d.comb += self.mm_start.eq(1)
                            m.next = "MATMUL"
            with m.State("LOAD"):
                # host words shift in from the top, so the first lands in the low bits (lane 0)
                assembled = Cat(word[32:], self.i.payload) if H > 1 else self.i.payload
                m.d.comb += [self.i.ready.eq(1), self.wr_addr.eq(args[0] + idx), self.wr_data.eq(assembled)]
                with m.If(self.i.valid):
                    m.d.sync += [word.eq(assembled), sub.eq(sub + 1)]
                    with m.If(sub + 1 == H):
                        m.d.comb += self.wr_en.eq(flags[0])
                        m.d.sync += [sub.eq(0), idx.eq(idx + 1)]
                        with m.If(idx + 1 == count):
                            m.next = "HEADER"
            with m.State("STORE_READ"):
                m.d.comb += [self.rd_addr.eq(args[0] + idx), self.rd_en.eq(1)]
                m.next = "STORE_LATCH"
            with m.State("STORE_LATCH"):
                m.d.sync += [word.eq(self.rd_data), sub.eq(0)]
                m.next = "STORE_SEND"
            with m.State("STORE_SEND"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(word[:32])]
                with m.If(self.o.ready):
                    m.d.sync += [word.eq(word >> 32), sub.eq(sub + 1)]
                    with m.If(sub + 1 == H):
                        m.d.sync += idx.eq(idx + 1)
                        m.next = "STORE_READ"
                        with m.If(idx + 1 == count):
                            m.next = "HEADER"
            with m.State("MATMUL"):
                with m.If(self.mm_done):
                    m.next = "HEADER"
            with m.State("EMIT"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(emit_word)]
                with m.If(self.o.ready):
                    m.d.sync += emit_idx.eq(emit_idx + 1)
                    with m.If(emit_idx + 1 == emit_n):
                        with m.If(emit_kind == 0):
                            m.d.sync += err.eq(0)        # SYNC reports, then clears
                        m.next = "HEADER"
        return m
