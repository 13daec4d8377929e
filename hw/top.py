"""The accelerator: sequencer, MATMUL engine (systolic array + requantizer), buffer pool, counters."""

from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .bufpool import BufferPool
from .counters import PerfCounters
from .engine import MatmulEngine
from .config import AcceleratorConfig
from .sequencer import Sequencer

__all__ = ["Accelerator"]


class Accelerator(wiring.Component):
    """The whole device behind one pair of 32-bit streams (``i``: instructions and data in; ``o``:
    answers out), built for one :class:`ambert.hw.config.AcceleratorConfig`.

    ``error`` mirrors the sticky error flags; ``busy`` is high while a MATMUL or a STORE runs.
    """

    i: In(stream.Signature(32))
    o: Out(stream.Signature(32))
    error: Out(4)
    busy: Out(1)

    def __init__(self, config=AcceleratorConfig()):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self.config = config
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        c = self.config
        m.submodules.seq = seq = Sequencer(c)
        m.submodules.engine = eng = MatmulEngine(c, seq.addr_bits)
        pool_latency = c.impl.pool_memory_latency
        m.submodules.pool = pool = BufferPool(8 * c.shape.lanes, c.shape.banks, c.shape.bank_words,
                                              c.impl.pool_subbanks, pool_latency)
        m.submodules.counters = cnt = PerfCounters(c.shape.lanes * c.shape.lanes)
        bank_bits = (c.shape.bank_words - 1).bit_length()
        S = c.impl.pool_subbanks
        sub_bits = (S - 1).bit_length()

        wiring.connect(m, wiring.flipped(self.i), seq.i)
        wiring.connect(m, seq.o, wiring.flipped(self.o))
        m.d.comb += [
            self.error.eq(seq.error), self.busy.eq(eng.busy | seq.busy),
            eng.start.eq(seq.mm_start), seq.mm_done.eq(eng.done),
            eng.a_addr.eq(seq.mm_a), eng.w_addr.eq(seq.mm_w), eng.p_addr.eq(seq.mm_p), eng.o_addr.eq(seq.mm_o),
            eng.m.eq(seq.mm_m), eng.k_tiles.eq(seq.mm_k_tiles), eng.n_tiles.eq(seq.mm_n_tiles),
            eng.mode.eq(seq.mm_mode), eng.cont.eq(seq.mm_continue), eng.hold.eq(seq.mm_hold),
            cnt.active.eq(eng.busy), cnt.issuing.eq(eng.issuing),
            seq.cnt_busy.eq(cnt.busy), seq.cnt_stalled.eq(cnt.stalled), seq.cnt_macs.eq(cnt.macs),
        ]

        def bank_of(addr):
            return addr >> bank_bits

        def offset(addr):
            return addr[:bank_bits]

        # who read which bank pool_read_latency cycles ago, to route the read data back: a flag a bank,
        # not a bank number decoded after its register into every multiplexer of the read word
        selects = [Cat(*(bank_of(addr) == b for b in range(c.shape.banks)))
                   for addr in (eng.a_rd.addr, eng.w_rd.addr, seq.rd_addr)]
        # read latency 4 or 5: the last flags a copy a byte of the word, kept apart, each beside the
        # multiplexers of its byte (which lie with the array column the byte goes to), and the stage
        # before them a copy every four bytes, each feeding four
        slices = c.shape.lanes if c.impl.pool_read_latency >= 4 else 1
        groups = -(-slices // 4) if slices > 4 and pool_latency > 1 else 1
        selects = [[x] for x in selects]
        for k in range(pool_latency):
            last = k == pool_latency - 1
            copies = slices if last else groups if k == pool_latency - 2 else 1
            held = [[Signal(c.shape.banks, name=f"{n}_bank{j if copies > 1 else ''}" if last else
                            f"{n}_bank_d{k}" + (f"_{j}" if copies > 1 else ""),
                            attrs={"ambert_replica": 1} if copies > 1 else {})
                     for j in range(copies)] for n in "aws"]
            m.d.sync += [h.eq(xs[j * len(xs) // copies]) for hs, xs in zip(held, selects) for j, h in enumerate(hs)]
            selects = held
        a_bank, w_bank, s_bank = held
        # a LOAD's words, and which bank each goes to
        seq_wr_en, seq_wr_addr, seq_wr_data = seq.wr_en, seq.wr_addr, seq.wr_data
        if c.impl.pool_read_latency >= 4:
            # read latency 4 or 5: registered once more first, so the sequencer's write enable (from the
            # link's FIFO through its state) and its decode into the bank flags' copies do not share a
            # cycle
            seq_wr_en = Signal(name="seq_wr_en")
            seq_wr_addr = Signal.like(seq.wr_addr, name="seq_wr_addr0")
            seq_wr_data = Signal.like(seq.wr_data, name="seq_wr_data0", reset_less=True)
            m.d.sync += [seq_wr_en.eq(seq.wr_en), seq_wr_addr.eq(seq.wr_addr), seq_wr_data.eq(seq.wr_data)]
        seq_w_sel = [seq_wr_en & (bank_of(seq_wr_addr) == b) for b in range(c.shape.banks)]
        if c.impl.pool_read_latency >= 3:
            # a large FPGA's: written a cycle later, from flip-flops, with a flag a bank that picks them
            # over the engine's words, so no decode fans out to a bank's write-data multiplexers (nothing
            # reads a LOAD's words sooner than the next command's dispatch, cycles later); with read
            # latency 4 or 5 the flag a copy a byte too, each beside its byte's multiplexers, which spread
            # with the bank's block RAMs
            wr_addr, wr_data = seq_wr_addr, seq_wr_data
            seq_wr_addr = Signal.like(seq.wr_addr, name="seq_wr_addr")
            seq_wr_data = Signal.like(seq.wr_data, name="seq_wr_data", reset_less=True)
            sel = [[Signal(name=f"seq_w_sel{b}" + (f"_{j}" if slices > 1 else ""),
                           attrs={"ambert_replica": 1} if slices > 1 else {}) for j in range(slices)]
                   for b in range(c.shape.banks)]
            m.d.sync += [seq_wr_addr.eq(wr_addr), seq_wr_data.eq(wr_data)]
            m.d.sync += [x.eq(y) for xs, y in zip(sel, seq_w_sel) for x in xs]
            seq_w_sel = sel
        else:
            seq_w_sel = [[x] for x in seq_w_sel]
        for b in range(c.shape.banks):
            port = pool.bank[b]
            # the checked MATMUL keeps its three streams in different banks, and the sequencer holds back
            # any LOAD or STORE that would touch a bank the running MATMUL or STORE uses, so each bank
            # has at most one reader and one writer at a time
            with m.If(eng.a_rd.en & (bank_of(eng.a_rd.addr) == b)):
                m.d.comb += [port.r_addr.eq(offset(eng.a_rd.addr)), port.r_en.eq(1)]
            with m.Elif(eng.w_rd.en & (bank_of(eng.w_rd.addr) == b)):
                m.d.comb += [port.r_addr.eq(offset(eng.w_rd.addr)), port.r_en.eq(1)]
            with m.Elif(seq.rd_en & (bank_of(seq.rd_addr) == b)):
                m.d.comb += [port.r_addr.eq(offset(seq.rd_addr)), port.r_en.eq(1)]
            # (the engine's words unless a LOAD writes the bank: the write data's select is the LOAD's
            # flag, not the engine's decode; as branches, not a multiplexer a sub-bank, for the simulator)
            with m.If(seq_w_sel[b][0]):
                m.d.comb += [port.w_row.eq(offset(seq_wr_addr) >> sub_bits),
                             port.w_en.eq(1 << seq_wr_addr[:sub_bits] if S > 1 else 1)]
            with m.Elif(eng.o_wr.en.any() & (bank_of(eng.o_wr.addr) == b)):
                m.d.comb += [port.w_row.eq(offset(eng.o_wr.addr) >> sub_bits), port.w_en.eq(eng.o_wr.en)]
            part = -(-len(seq_wr_data) // len(seq_w_sel[b]))
            for j, sel in enumerate(seq_w_sel[b]):
                bits = slice(part * j, part * (j + 1))
                with m.If(sel):
                    m.d.comb += [port.w_data[s][bits].eq(seq_wr_data[bits]) for s in range(S)]
                with m.Else():
                    m.d.comb += [port.w_data[s][bits].eq(eng.o_wr.data[s][bits]) for s in range(S)]
        words = [eng.a_rd.data, eng.w_rd.data, seq.rd_data]
        if c.impl.pool_read_latency >= 4:
            # each reader's word registered after the bank multiplexer: from the banks' output registers,
            # spread across the chip, to the multiplexer, then on to the reader, a cycle each. The
            # registers carry no reset (the readers' ports would fan the accelerator's reset out to every
            # bit of them)
            muxed = [Signal.like(w, name=f"{n}_word") for w, n in zip(words, "aws")]
            held = [Signal.like(w, name=f"{n}_word_q", reset_less=True) for w, n in zip(words, "aws")]
            m.d.sync += [h.eq(x) for h, x in zip(held, muxed)]
            m.d.comb += [w.eq(h) for w, h in zip(words, held)]
            words = muxed
        part = -(-len(words[0]) // slices)
        for b in range(c.shape.banks):
            for word, sels in zip(words, (a_bank, w_bank, s_bank)):
                for j, sel in enumerate(sels):
                    with m.If(sel[b]):
                        bits = slice(part * j, part * (j + 1))
                        m.d.comb += word[bits].eq(pool.bank[b].r_data[bits])
        return m
