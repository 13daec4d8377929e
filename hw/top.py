"""The accelerator: sequencer, MATMUL engine (systolic array + requantizer), buffer pool, counters."""

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .bufpool import BufferPool
from .counters import PerfCounters
from .engine import MatmulEngine
from .isa import AcceleratorConfig
from .sequencer import Sequencer

__all__ = ["Accelerator"]


class Accelerator(wiring.Component):
    """The whole device behind one pair of 32-bit streams (``i``: instructions and data in; ``o``:
    answers out), built for one :class:`hw.isa.AcceleratorConfig`.

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
        m.submodules.engine = eng = MatmulEngine(c.lanes, seq.addr_bits, c.acc_depth, c.requant_lanes,
                                                     c.serial_mul_bits, c.pool_subbanks, c.compact_array,
                                                     c.pool_read_latency, c.weight_write_latency,
                                                     c.product_latency)
        m.submodules.pool = pool = BufferPool(8 * c.lanes, c.banks, c.bank_words, c.pool_subbanks,
                                              c.pool_read_latency)
        m.submodules.counters = cnt = PerfCounters(c.lanes * c.lanes)
        bank_bits = (c.bank_words - 1).bit_length()
        S = c.pool_subbanks
        sub_bits = (S - 1).bit_length()

        wiring.connect(m, wiring.flipped(self.i), seq.i)
        wiring.connect(m, seq.o, wiring.flipped(self.o))
        m.d.comb += [
            self.error.eq(seq.error), self.busy.eq(eng.busy | seq.busy),
            eng.start.eq(seq.mm_start), seq.mm_done.eq(eng.done),
            eng.a_addr.eq(seq.mm_a), eng.w_addr.eq(seq.mm_w), eng.p_addr.eq(seq.mm_p), eng.o_addr.eq(seq.mm_o),
            eng.m.eq(seq.mm_m), eng.k_tiles.eq(seq.mm_k_tiles), eng.n_tiles.eq(seq.mm_n_tiles),
            eng.mode.eq(seq.mm_mode),
            cnt.active.eq(eng.busy), cnt.issuing.eq(eng.issuing),
            seq.cnt_busy.eq(cnt.busy), seq.cnt_stalled.eq(cnt.stalled), seq.cnt_macs.eq(cnt.macs),
        ]

        def bank_of(addr):
            return addr >> bank_bits

        def offset(addr):
            return addr[:bank_bits]

        # who read which bank pool_read_latency cycles ago, to route the read data back
        selects = [bank_of(eng.a_rd.addr), bank_of(eng.w_rd.addr), bank_of(seq.rd_addr)]
        for k in range(c.pool_read_latency):
            suffix = "" if k == c.pool_read_latency - 1 else f"_d{k}"
            held = [Signal(range(c.banks), name=f"{n}_bank{suffix}") for n in "aws"]
            m.d.sync += [h.eq(x) for h, x in zip(held, selects)]
            selects = held
        a_bank, w_bank, s_bank = selects
        for b in range(c.banks):
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
            with m.If(eng.o_wr.en.any() & (bank_of(eng.o_wr.addr) == b)):
                m.d.comb += [port.w_row.eq(offset(eng.o_wr.addr) >> sub_bits), port.w_en.eq(eng.o_wr.en)]
                for s in range(S):
                    m.d.comb += port.w_data[s].eq(eng.o_wr.data[s])
            with m.Elif(seq.wr_en & (bank_of(seq.wr_addr) == b)):
                m.d.comb += [port.w_row.eq(offset(seq.wr_addr) >> sub_bits),
                             port.w_en.eq(1 << seq.wr_addr[:sub_bits] if S > 1 else 1)]
                for s in range(S):
                    m.d.comb += port.w_data[s].eq(seq.wr_data)
        for b in range(c.banks):
            with m.If(a_bank == b):
                m.d.comb += eng.a_rd.data.eq(pool.bank[b].r_data)
            with m.If(w_bank == b):
                m.d.comb += eng.w_rd.data.eq(pool.bank[b].r_data)
            with m.If(s_bank == b):
                m.d.comb += seq.rd_data.eq(pool.bank[b].r_data)
        return m
