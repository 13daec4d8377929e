"""The MATMUL engine: walks the tiles of one GEMM through the array, the accumulators and the epilogue."""

from types import SimpleNamespace

from amaranth import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from ambert.proto.isa import MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, Mode

from .array import SystolicArray
from .bufpool import SUBBANKS
from .requant import BitSerialRequantizer, Requantizer

__all__ = ["MatmulEngine", "mode_words"]


def _delay(m, sig, n, name):
    """``sig`` through ``n`` registers (named ``<name>_d<k>``)."""
    for k in range(n):
        nxt = Signal.like(sig, name=f"{name}_d{k}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


def mode_words(mode):
    """Pool words per output row for a MATMUL mode signal (``proto.isa.MODE_WORDS``, as logic)."""
    return Mux(mode == Mode.INT8, MODE_WORDS[Mode.INT8],
               Mux(mode == Mode.INT16, MODE_WORDS[Mode.INT16], MODE_WORDS[Mode.INT32]))


class PoolRead(wiring.Signature):
    def __init__(self, addr_bits, word_bits):
        super().__init__({"addr": Out(addr_bits), "en": Out(1), "data": In(word_bits)})


class PoolWrite(wiring.Signature):
    def __init__(self, addr_bits, word_bits, subbanks=SUBBANKS):
        super().__init__({"addr": Out(addr_bits), "data": Out(data.ArrayLayout(unsigned(word_bits), subbanks)),
                          "en": Out(subbanks)})


class MatmulEngine(wiring.Component):
    """Run ``out = requant(A @ W.T + bias)`` for operands laid out in the pool as ``proto.isa`` packs them.

    On ``start`` (while idle) the engine latches the arguments and walks the tiles n-tile-major: for each
    n-tile, for each k-tile, it streams the tile's M activation rows through the array, one per cycle,
    adding each output row to its partial sums in the accumulator memory; the last k-tile's rows go
    through the :class:`Requantizer` and are written to the output region. While a tile computes, the
    next tile's weights (and, at an n-tile boundary, its requant parameters) are loaded into the array's
    idle weight bank, so for M >= 3 * lanes + 20 tiles follow each other without a bubble. ``done``
    pulses when the last output row is written. With a requantizer narrower than the array
    (``requant_lanes``) or a digit-serial one (``serial_mul_bits``), the rows of each last k-tile issue
    one every ``requant.steps`` cycles. With ``serial_mul_bits=1`` it is the
    :class:`BitSerialRequantizer` (``requant_lanes`` must be 1): the parameters live in a block RAM it
    reads itself, it reads each row from the engine's sum register, so no row at all follows a last
    k-tile's sooner than ``requant.steps`` cycles, and its lanes go to the pool as they come out.
    ``compact_array``: the array's small-FPGA layout (:class:`SystolicArray` ``paired``).

    The arguments must already be checked (the :class:`Sequencer` does): A, W/P and O in different banks,
    M <= ``acc_depth``, O aligned to 4 words, each region inside the pool (so the tile counts fit
    ``addr_bits + 1`` bits).

    Pool access: ``a_rd`` (activations), ``w_rd`` (weights and parameters), ``o_wr`` (output rows); each
    read returns its word ``read_latency`` (1 to 5) cycles after ``en``: each cycle beyond one delays the
    rows, the loads and the end of a MATMUL by a cycle, nothing else; so does each cycle of
    ``weight_write_latency`` (0 to 2, the array's ``write_latency``; >= 1 registers the parameter words'
    writes too, once) the end of each load, and ``product_latency`` (1 or 2, the array's and the
    requantizer's) and ``hop_latency`` (1 or 2, the array's; 2: ``lanes`` cycles) the rows. (With 3 to 5,
    the pool of a large FPGA, the accumulator memories' row address comes from flip-flops too; with 4 or 5
    their output is registered as well, so tiles start at least a cycle further apart, the output writes
    are registered, so a MATMUL ends a cycle later, and a narrow requantizer's row copy loads by an enable
    a group of its lanes.) With ``subbanks`` 1 an output row is written a word a cycle (up to 4 cycles,
    which a requantizer taking >= 4 cycles a row leaves).
    ``issuing`` is high in cycles that feed a row to the array (for the performance counters).

    A chained MATMUL (``proto.isa.Chain``, one n-tile): with ``cont`` its first k-tile adds to the sums
    the accumulators hold rather than to zero; with ``hold`` its last k-tile's sums go back to the
    accumulators, nothing is requantized or written, and its parameters are not loaded; it is ``done`` a
    cycle after its last row is read, that row's word and the rows before it still on their way through
    the pool's read pipeline, the array and the accumulators. A MATMUL's first tile waits the margins a
    following tile would (its weights go to the bank the last tile did not use, its rows after the
    accumulators' gap), so a chain's next run starts as soon as its first tile is loaded.
    """

    def __init__(self, config, addr_bits):
        shape, impl = config.shape, config.impl
        self.lanes = lanes = shape.lanes
        self.read_latency = impl.pool_read_latency
        self.acc_depth = shape.acc_depth
        self.word_bits = 8 * lanes
        self.subbanks = subbanks = impl.pool_subbanks
        self.compact_array = impl.compact_array
        self.array = SystolicArray(lanes, lanes, paired=impl.compact_array, write_latency=impl.weight_write_latency,
                                   product_latency=impl.product_latency, hop_latency=impl.hop_latency)
        # bit-serial: one lane at a time, the parameters read from a memory as it needs them
        self.bit_serial = impl.serial_mul_bits == 1
        if self.bit_serial:
            self.requant = BitSerialRequantizer(lanes, tag_bits=addr_bits + 1)
        else:
            # read latency 4 or 5 (a large FPGA's): a narrow requantizer's row copy loads by an enable a
            # group of lanes, each beside its group
            copied = impl.requant_lanes not in (None, lanes) or impl.serial_mul_bits is not None
            self.requant = Requantizer(lanes, impl.requant_lanes, impl.serial_mul_bits, impl.product_latency,
                                       load_copies=impl.pool_read_latency >= 4 and copied)
        if subbanks == 1 and self.requant.steps < 4:
            raise ValueError(f"a pool of one memory a bank takes an output row in up to 4 cycles: the "
                             f"requantizer must take >= 4 cycles a row, not {self.requant.steps} (requant_lanes)")
        super().__init__({
            "start": In(1),
            "a_addr": In(addr_bits), "w_addr": In(addr_bits), "p_addr": In(addr_bits), "o_addr": In(addr_bits),
            "m": In(16), "k_tiles": In(16), "n_tiles": In(16), "mode": In(2),
            "cont": In(1), "hold": In(1),
            "busy": Out(1), "done": Out(1), "issuing": Out(1),
            "a_rd": Out(PoolRead(addr_bits, self.word_bits)),
            "w_rd": Out(PoolRead(addr_bits, self.word_bits)),
            "o_wr": Out(PoolWrite(addr_bits, self.word_bits, subbanks)),
        })

    def elaborate(self, platform):
        """The tile loop in five parts, each adding its logic to ``m`` in turn and its signals to ``s``,
        which the later parts read: the latched arguments and the accumulators, the loader, the feeder,
        the drain and the epilogue."""
        m = Module()
        m.submodules.array = array = self.array
        m.submodules.requant = self.requant
        s = SimpleNamespace(L=self.lanes, WB=self.word_bits, P=PARAM_WORDS_PER_LANE_GROUP, lat=array.latency)
        s.extra = self.read_latency - 1     # cycles the pool's reads take beyond one
        # read latency 4 or 5 (a large FPGA's): the accumulator memories' output and the output writes
        # registered too, a row's sums read a cycle earlier
        s.acc_q = s.write_q = self.read_latency >= 4
        s.gap = s.lat + 6 + s.acc_q         # a tile starts >= this long after the previous one (accumulator RAW)
        s.load_margin = s.lat + 8           # the idle weight bank and param buffer are free this long after a start
        self._arguments(m, s)
        self._loader(m, s)
        self._feeder(m, s)
        self._drain(m, s)
        self._epilogue(m, s)
        return m

    def _arguments(self, m, s):
        """The accumulator memory (``acc_depth`` rows of ``lanes`` int32), the registers the arguments are
        latched into, and ``since``: cycles since the current tile started, saturating above every margin
        the loader and the feeder compare it with."""
        L, rq = s.L, self.requant
        s.acc_mem = acc_mem = memory.Memory(shape=unsigned(32 * L), depth=self.acc_depth, init=[])
        m.submodules.acc_mem = acc_mem
        s.acc_rd = acc_mem.read_port()
        s.acc_wr = acc_mem.write_port()

        s.a_base = Signal.like(self.a_addr)
        w_ptr, p_ptr = Signal.like(self.w_addr), Signal.like(self.p_addr)
        s.w_ptr, s.p_ptr = w_ptr, p_ptr
        # the small-FPGA variant's counters as wide as the checked arguments can be (M <= acc_depth; a tile
        # count, a region size in words, at most the pool's): fewer logic cells than 16 bits. Elsewhere
        # 16, which Verilator simulates faster.
        s.row_bits = row_bits = self.acc_depth.bit_length() if self.bit_serial else 16
        s.tile_bits = tile_bits = min(16, len(self.a_addr) + 1) if self.bit_serial else 16
        rows, kt_n, nt_n, mode = Signal(row_bits), Signal(tile_bits), Signal(tile_bits), Signal(2)
        s.rows, s.kt_n, s.nt_n, s.mode = rows, kt_n, nt_n, mode
        # a chained MATMUL's (proto.isa.Chain): its first k-tile adds to the accumulators' sums; its last
        # k-tile's rows go back to the accumulators, not to the requantizer (whose parameters it skips)
        s.cont, s.hold = Signal(name="chain_continue"), Signal(name="chain_hold")
        s.row_words = row_words = Signal(3)
        m.d.comb += row_words.eq(mode_words(mode))
        s.rows_words = Mux(row_words == 4, rows << 2, Mux(row_words == 2, rows << 1, rows))   # no multiplier

        # a bit-serial requantizer reads a row's parameters while it works on the row, up to its latency
        # after the row left the array: the parameter buffer is free that much later than the weight bank
        s.param_margin = s.load_margin + rq.latency if self.bit_serial else s.load_margin
        top = max(s.lat + 15, s.param_margin)
        # (saturated out of reset: the first MATMUL waits on no margin)
        s.since = since = Signal(range(top + 1), init=top)
        m.d.sync += since.eq(Mux(since == top, since, since + 1))

    def _loader(self, m, s):
        """The loader: the next tile's weights into the array's idle weight bank and, at an n-tile
        boundary, its requantization parameters into the idle half of the parameter buffer, one word a
        cycle over ``w_rd``. It starts on ``ld_go`` (the first tile at once; every later one once the
        tile before has run ``load_margin`` cycles, its bank free) and sets ``ld_ready`` when the last
        word is in the array; ``ld_in_flight`` counts every word read and not yet landed, so a load
        shorter than the read latency still waits for its words."""
        L, P, WB, tile_bits, array, rq = s.L, s.P, s.WB, s.tile_bits, self.array, self.requant
        w_ptr, p_ptr, kt_n, nt_n, since = s.w_ptr, s.p_ptr, s.kt_n, s.nt_n, s.since
        ld_go, ld_busy, ld_ready, ld_wait, ld_pending = Signal(), Signal(), Signal(), Signal(), Signal()
        ld_kt, ld_nt = Signal(tile_bits), Signal(tile_bits)    # the tile to load next
        ld_bank = Signal()
        ld_idx = Signal(range(L + P + 1))
        ld_params = Signal()
        ld_rd_valid, ld_rd_idx = Signal(), Signal.like(ld_idx)   # the word arriving this cycle
        ld_rd_pbuf = Signal()
        # the word read last cycle: it arrives now, or (a pool with registered outputs) ``extra`` cycles later
        ld_iss_valid, ld_iss_idx, ld_iss_pbuf = ld_rd_valid, ld_rd_idx, ld_rd_pbuf
        ld_in_flight = [ld_rd_valid]             # the valid flags of the words read and not yet arrived
        for k in range(s.extra):
            later = (ld_iss_valid, ld_iss_idx, ld_iss_pbuf)
            ld_iss_valid, ld_iss_idx, ld_iss_pbuf = Signal(name=f"ld_iss{k}_valid"), Signal.like(ld_idx,
                name=f"ld_iss{k}_idx"), Signal(name=f"ld_iss{k}_pbuf")
            m.d.sync += [x.eq(y) for x, y in zip(later, (ld_iss_valid, ld_iss_idx, ld_iss_pbuf))]
            ld_in_flight.append(ld_iss_valid)
        # a weight word is in the array a cycle after it arrives when the array registers its writes (and
        # a parameter word in its buffer: see below)
        if weight_write_latency := array.write_latency:
            ld_wr_valid = ld_rd_valid
            for k in range(weight_write_latency):
                landing = Signal(name=f"ld_wr{k}_valid")
                m.d.sync += landing.eq(ld_wr_valid)
                ld_in_flight.append(landing)
                ld_wr_valid = landing
        if not self.bit_serial:
            # no reset: written before a row reads them, and the accelerator's reset stays off their
            # 2 x 9 words of flip-flops
            s.params = params = [[Signal(WB, name=f"param{b}_{w}", reset_less=True) for w in range(P)]
                                 for b in range(2)]

        # the loader's tile is a last k-tile; n-tiles follow it. Registered a cycle late: they are read
        # when a load ends, at least L + 2 cycles after the counters last moved, so no increment and
        # compare share a cycle
        ld_last_k, ld_more_n = Signal(), Signal()
        m.d.sync += [ld_last_k.eq(ld_kt + 1 == kt_n), ld_more_n.eq(ld_nt + 1 != nt_n)]
        m.d.sync += ld_iss_valid.eq(0)
        # whether the loader reads this cycle, and whether a weight word (else a parameter word): flags set
        # a cycle ahead, so the pool's address comes from flip-flops through one multiplexer
        ld_reading, ld_on_w = Signal(), Signal()
        # the read addresses whatever the state: only the enables decide, so the pool's address
        # multiplexers see no more logic in front of them than the enables'
        m.d.comb += self.w_rd.addr.eq(Mux(ld_on_w, w_ptr, p_ptr))
        with m.If(ld_go):
            m.d.sync += [ld_busy.eq(1), ld_idx.eq(0), ld_params.eq((ld_kt == 0) & ~s.hold), ld_reading.eq(1),
                         ld_on_w.eq(1)]
        with m.If(ld_busy):
            with m.If(ld_reading):
                m.d.comb += self.w_rd.en.eq(1)
                m.d.sync += [ld_iss_valid.eq(1), ld_iss_idx.eq(ld_idx), ld_iss_pbuf.eq(ld_nt[0]),
                             ld_idx.eq(ld_idx + 1),
                             ld_on_w.eq(ld_on_w & (ld_idx != L - 1)),
                             ld_reading.eq(ld_idx != Mux(ld_params, L + P - 1, L - 1))]
                with m.If(ld_on_w):
                    m.d.sync += w_ptr.eq(w_ptr + 1)
                with m.Else():
                    m.d.sync += p_ptr.eq(p_ptr + 1)
            with m.Elif(~Cat(*ld_in_flight).any()):
                # the last word has landed and, where the array registers its writes, is in the array:
                # the tile is ready; step to the following tile
                m.d.sync += [ld_busy.eq(0), ld_ready.eq(1), ld_bank.eq(~ld_bank)]
                with m.If(ld_last_k):
                    m.d.sync += [ld_kt.eq(0), ld_nt.eq(ld_nt + 1), ld_pending.eq(ld_more_n)]
                with m.Else():
                    m.d.sync += ld_kt.eq(ld_kt + 1)
        m.d.comb += [array.w_data.eq(self.w_rd.data), array.w_row.eq(ld_rd_idx[:max(1, (L - 1).bit_length())]),
                     array.w_bank.eq(ld_bank), array.w_we.eq(ld_rd_valid & (ld_rd_idx < L))]
        if self.bit_serial:
            # the two parameter buffers in one memory (a block RAM, not 2 x 9 words of flip-flops): 16
            # words a buffer, read by the requantizer with the buffer its row carries in its tag
            m.submodules.param_mem = param_mem = memory.Memory(shape=unsigned(WB), depth=32, init=[])
            p_wr, p_rd = param_mem.write_port(), param_mem.read_port(transparent_for=())
            m.d.comb += [p_wr.en.eq(ld_rd_valid & (ld_rd_idx >= L)), p_wr.data.eq(self.w_rd.data),
                         p_wr.addr.eq(Cat((ld_rd_idx - L)[:4], ld_rd_pbuf)),
                         p_rd.en.eq(rq.p_en), p_rd.addr.eq(Cat(rq.p_addr, rq.tag_held[-1])),
                         rq.p_data.eq(p_rd.data)]
        else:
            p_data = self.w_rd.data
            p_we = [[ld_rd_valid & (ld_rd_idx == L + w) & (ld_rd_pbuf == b) for w in range(P)]
                    for b in range(2)]
            if weight_write_latency:
                # registered like the array's weight writes, a copy of the same word kept apart from the
                # array's column registers (merged, the parameters would come from one PE's, across the
                # die; see hw.array)
                p_data = Signal(WB, name="p_wr_data", reset_less=True, attrs={"ambert_replica": 1})
                p_we_reg = [[Signal(name=f"p_we{b}_{w}") for w in range(P)] for b in range(2)]
                m.d.sync += p_data.eq(self.w_rd.data)
                m.d.sync += [p_we_reg[b][w].eq(p_we[b][w]) for b in range(2) for w in range(P)]
                p_we = p_we_reg
            for b in range(2):
                for w in range(P):
                    with m.If(p_we[b][w]):
                        m.d.sync += params[b][w].eq(p_data)
        # whether ``since`` has passed each margin (and the gap), as flip-flops set a cycle ahead (``since``
        # counts up from 0 after a tile starts and saturates above them all), so no compare against a
        # multiplexed margin decides in the cycle
        restart = Signal()
        past_load, past_param, past_gap = Signal(init=1), Signal(init=1), Signal(init=1)
        m.d.sync += [past_load.eq(~restart & (since >= s.load_margin - 1)),
                     past_param.eq(~restart & (since >= s.param_margin - 1)),
                     past_gap.eq(~restart & (since >= s.gap - 1))]
        margin_passed = Mux(ld_kt == 0, past_param, past_load) if s.param_margin != s.load_margin else past_load
        with m.If(ld_wait & margin_passed & ~ld_busy):
            m.d.comb += ld_go.eq(1)
            m.d.sync += ld_wait.eq(0)
        s.ld_go, s.ld_busy, s.ld_ready, s.ld_wait, s.ld_pending = ld_go, ld_busy, ld_ready, ld_wait, ld_pending
        s.ld_kt, s.ld_nt, s.ld_bank = ld_kt, ld_nt, ld_bank
        s.restart, s.past_gap, s.margin_passed = restart, past_gap, margin_passed

    def _feeder(self, m, s):
        """The feeder: one activation row a cycle into the array (``a_rd``), tile after tile, n-tile-major,
        k-tile-minor; rows of a last k-tile no faster than the requantizer takes them (one every
        ``requant.steps`` cycles). Its tile-loop decisions (a tile's last row, its last k-tile, the last
        n-tile) are flip-flops set a cycle ahead from the counts less two. Stage 1 carries each row's
        bookkeeping (first k-tile, last k-tile, bank select, parameter buffer, row, output address) to
        the drain; stage 2 registers the row's activations in front of the array. The FSM: IDLE (the
        arguments latched every cycle, so ``start`` drives only the state), LOAD_FIRST, WAIT_TILE (the
        tile's weights loaded and the accumulator gap passed), RUN, DRAIN (the last rows through the
        array and the epilogue, then ``done``)."""
        L, rq, lat, extra, array = s.L, self.requant, s.lat, s.extra, self.array
        row_bits, tile_bits = s.row_bits, s.tile_bits
        a_base, w_ptr, p_ptr = s.a_base, s.w_ptr, s.p_ptr
        rows, kt_n, nt_n, mode, row_words, rows_words = s.rows, s.kt_n, s.nt_n, s.mode, s.row_words, s.rows_words
        since, restart, past_gap = s.since, s.restart, s.past_gap
        ld_go, ld_busy, ld_ready, ld_wait, ld_pending = s.ld_go, s.ld_busy, s.ld_ready, s.ld_wait, s.ld_pending
        ld_kt, ld_nt = s.ld_kt, s.ld_nt
        fd_row, fd_kt, fd_nt = Signal(row_bits), Signal(tile_bits), Signal(tile_bits)
        fd_sel, fd_last_tile = Signal(), Signal()
        a_tile, a_ptr = Signal.like(a_base), Signal.like(a_base)
        m.d.comb += self.a_rd.addr.eq(a_ptr)        # as the loader's: only the enable decides
        o_tile, o_ptr = Signal.like(self.o_addr), Signal.like(self.o_addr)
        # +3: the last words of a row written one a cycle; +1: the writes registered
        drain_end = lat + rq.latency + 6 + extra + (3 if self.subbanks == 1 else 0) + s.write_q
        drain = Signal(range(max(lat + rq.latency + 11, drain_end + 1)))
        # the feeder's decisions from registers, each set a cycle ahead: compared with the counts less two,
        # registered at the start (a count of one never matches, as a counter is never -1)
        last_k, row_last, nt_last = Signal(), Signal(), Signal()
        kt_m2, rows_m2, nt_m2 = Signal.like(kt_n), Signal.like(rows), Signal.like(nt_n)

        # rows of a last k-tile go to the requantizer no faster than it takes them; the pace runs across
        # tile boundaries (a tile may start the cycle after the last one's last row)
        issue = Signal()
        pace = Signal(range(rq.steps))          # cycles until the requantizer takes another row
        # (the bit-serial requantizer reads its row from t_sum for that long, so no row at all follows)
        # "pace is zero" is a flip-flop of its own, so no compare runs on into the counters' enables
        pace_zero = Signal(init=1)
        m.d.sync += pace_zero.eq(pace <= 1)
        m.d.comb += issue.eq(pace_zero if self.bit_serial else ~last_k | pace_zero)
        m.d.sync += pace.eq(Mux(pace == 0, 0, pace - 1))

        # stage 1: the row whose activation word arrives from memory this cycle (with a read latency of 2,
        # the next)
        s1_valid, s1_zero, s1_last, s1_sel, s1_pbuf = Signal(), Signal(), Signal(), Signal(), Signal()
        s1_row, s1_optr = Signal.like(fd_row), Signal.like(o_ptr)
        m.d.sync += s1_valid.eq(0)

        with m.FSM() as fsm:
            with m.State("IDLE"):
                # the arguments are latched every idle cycle, so in the cycle of ``start`` too: ``start``
                # (the sequencer's dispatch checks) then drives the state register only, not the enables
                # of all these registers; nothing reads them idle
                m.d.sync += [a_base.eq(self.a_addr), w_ptr.eq(self.w_addr), p_ptr.eq(self.p_addr),
                             rows.eq(self.m), kt_n.eq(self.k_tiles), nt_n.eq(self.n_tiles),
                             mode.eq(self.mode), s.cont.eq(self.cont), s.hold.eq(self.hold),
                             ld_kt.eq(0), ld_nt.eq(0), ld_ready.eq(0), ld_pending.eq(1),
                             fd_kt.eq(0), fd_nt.eq(0),
                             a_tile.eq(self.a_addr), o_tile.eq(self.o_addr)]
                m.d.sync += [last_k.eq(self.k_tiles == 1), kt_m2.eq(self.k_tiles - 2), rows_m2.eq(self.m - 2),
                             nt_last.eq(self.n_tiles == 1), nt_m2.eq(self.n_tiles - 2)]
                with m.If(self.start):
                    m.next = "LOAD_FIRST"
            with m.State("LOAD_FIRST"):
                # (the weight banks alternate from MATMUL to MATMUL, and a HOLD's rows may still be in the
                # array: its first tile's load, and its first row, wait the margins a following tile's do)
                with m.If(s.margin_passed):
                    m.d.comb += ld_go.eq(1)
                    m.next = "WAIT_TILE"
            with m.State("WAIT_TILE"):
                with m.If(ld_ready & ~ld_busy & past_gap):
                    m.d.sync += [ld_ready.eq(0), since.eq(0), fd_row.eq(0),
                                 a_ptr.eq(a_tile), o_ptr.eq(o_tile), ld_wait.eq(ld_pending),
                                 fd_last_tile.eq(last_k & nt_last), row_last.eq(rows == 1)]
                    m.d.comb += restart.eq(1)
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(issue & last_k):
                    m.d.sync += [pace.eq(rq.steps - 1), pace_zero.eq(rq.steps == 1)]
                with m.If(issue):
                    m.d.comb += [self.issuing.eq(1), self.a_rd.en.eq(1)]
                    m.d.sync += [s1_valid.eq(1), s1_zero.eq((fd_kt == 0) & ~s.cont),
                                 s1_last.eq(last_k & ~s.hold),
                                 s1_sel.eq(fd_sel), s1_pbuf.eq(fd_nt[0]), s1_row.eq(fd_row), s1_optr.eq(o_ptr)]
                    m.d.sync += [fd_row.eq(fd_row + 1), a_ptr.eq(a_ptr + 1), o_ptr.eq(o_ptr + row_words),
                                 row_last.eq(fd_row == rows_m2)]
                    with m.If(row_last):
                        m.d.sync += [fd_sel.eq(~fd_sel), a_tile.eq(a_tile + rows)]
                        with m.If(last_k):
                            m.d.sync += [fd_kt.eq(0), fd_nt.eq(fd_nt + 1), a_tile.eq(a_base),
                                         o_tile.eq(o_tile + rows_words), last_k.eq(kt_n == 1),
                                         nt_last.eq(fd_nt == nt_m2)]
                        with m.Else():
                            m.d.sync += [fd_kt.eq(fd_kt + 1), last_k.eq(fd_kt == kt_m2)]
                        with m.If(fd_last_tile):
                            # a HOLD is done a cycle after its last row was read from the pool: nothing
                            # of it touches the pool or the epilogue again
                            m.d.sync += drain.eq(Mux(s.hold, drain_end, 0))
                            m.next = "DRAIN"
                        with m.Else():
                            m.next = "WAIT_TILE"
            with m.State("DRAIN"):
                m.d.sync += drain.eq(drain + 1)
                with m.If(drain == drain_end):
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))

        # stage 2: the row's activations registered in front of the array, so the block RAM outputs and the
        # bank multiplexer end at a flip-flop rather than run on into the multipliers
        s2_a = Signal(8 * L, name="s2_a", reset_less=True)
        s2_sel, s2_valid = Signal(), Signal()
        # (a pool with registered outputs: its word comes a cycle after stage 1, and the row's data waits)
        m.d.sync += [s2_a.eq(self.a_rd.data), s2_sel.eq(_delay(m, s1_sel, extra, "s1_sel")),
                     s2_valid.eq(_delay(m, s1_valid, extra, "s1_valid"))]
        m.d.comb += [array.a.eq(s2_a), array.sel.eq(s2_sel), array.valid.eq(s2_valid)]
        s.s1 = [s1_last, s1_row, s1_optr, s1_pbuf, s1_zero]

    def _drain(self, m, s):
        """The drain: each row's sums leave the array and are added to its accumulators (none on its
        first k-tile) — the accumulator row read the cycle before the row leaves (``p_``), added as it
        leaves (``u_``), the sum registered (``t_sum``) — then written back, or (a last k-tile) handed to
        the requantizer. The partial sums continue at the array's output, not in its top row: no skew
        registers for 32-bit sums and one adder a column. The row's bookkeeping follows it through a
        RAM ring as long as the array's latency."""
        L, lat, extra, acc_q, array = s.L, s.lat, s.extra, s.acc_q, self.array
        acc_rd, acc_wr = s.acc_rd, s.acc_wr
        p_info = s.s1
        if self.read_latency >= 3:
            # a large FPGA's: the ring's block RAM output registered, so that the accumulator memories'
            # address comes from flip-flops placed near them
            p_last, p_row, p_optr, p_pbuf, p_zero = (_delay(m, p, 1, f"p_{n}") for p, n in zip(
                self._ring_delay(m, p_info, lat + extra - 1 - acc_q, "p_info"),
                ("last", "row", "optr", "pbuf", "zero")))
        else:
            p_last, p_row, p_optr, p_pbuf, p_zero = self._ring_delay(m, p_info, lat + extra, "p_info")
        m.d.comb += acc_rd.addr.eq(p_row)
        acc_in = acc_rd.data
        if acc_q:
            # the sums read a cycle ahead into flip-flops, so a block RAM's clock-to-out and a 32-bit add
            # do not share a cycle
            acc_in = Signal.like(acc_rd.data, name="acc_q", reset_less=True)
            m.d.sync += acc_in.eq(acc_rd.data)
            p_last, p_row, p_optr, p_pbuf, p_zero = (_delay(m, p, 1, f"p_{n}_q") for p, n in zip(
                (p_last, p_row, p_optr, p_pbuf, p_zero), ("last", "row", "optr", "pbuf", "zero")))
        u_last, u_row, u_optr, u_pbuf, u_zero = (Signal.like(p, name=f"u_{n}") for p, n in zip(
            (p_last, p_row, p_optr, p_pbuf, p_zero), ("last", "row", "optr", "pbuf", "zero")))
        m.d.sync += [u.eq(p) for u, p in zip((u_last, u_row, u_optr, u_pbuf, u_zero),
                                             (p_last, p_row, p_optr, p_pbuf, p_zero))]
        t_valid, t_last, t_row, t_optr, t_pbuf = Signal(), Signal(), Signal.like(u_row), Signal.like(u_optr), Signal()
        t_sum = Signal(data.ArrayLayout(unsigned(32), L), name="t_sum", reset_less=True)
        # a row for the requantizer flagged from a flip-flop of its own: its valid loads the requantizer's
        # copy of the row
        t_requant = Signal()
        m.d.sync += [t_valid.eq(array.out_valid), t_last.eq(u_last), t_row.eq(u_row), t_optr.eq(u_optr),
                     t_pbuf.eq(u_pbuf), t_requant.eq(array.out_valid & u_last)]
        zeros = [u_zero] * L
        if acc_q:
            # a copy of the "first k-tile" flag a column, kept apart, each beside its column's adder
            zeros = [Signal(name=f"u_zero{j}", attrs={"ambert_replica": 1}) for j in range(L)]
            m.d.sync += [z.eq(p_zero) for z in zeros]
        sums = [t_sum[j].eq(array.out[j] + Mux(zeros[j], 0, acc_in[32 * j: 32 * j + 32])) for j in range(L)]
        if self.bit_serial:
            # the bit-serial requantizer reads its row from here, a lane at a time: t_sum holds each row
            # until the next (and no row follows a last k-tile's sooner than the requantizer takes it)
            with m.If(array.out_valid):
                m.d.sync += sums
        else:
            m.d.sync += sums
        m.d.comb += [acc_wr.en.eq(t_valid & ~t_last), acc_wr.addr.eq(t_row), acc_wr.data.eq(t_sum)]
        s.t_sum, s.t_requant, s.t_optr, s.t_pbuf, s.u_last = t_sum, t_requant, t_optr, t_pbuf, u_last

    def _epilogue(self, m, s):
        """The epilogue: a last k-tile's rows through the requantizer (its parameters from the row's
        half of the parameter buffer: bias in words 0-3, m0 in 4-7, shifts in 8, as ``proto.isa``
        packs them) and into the output region over ``o_wr``, registered first where the pool is a
        large FPGA's."""
        L, P, WB, rq, array, mode = s.L, s.P, s.WB, self.requant, self.array, s.mode

        def lanes_of(words, bits, j):
            return Cat(*words)[bits * j: bits * j + bits]
        m.d.comb += [rq.acc.eq(s.t_sum), rq.valid.eq(s.t_requant), rq.mode.eq(mode)]
        if getattr(rq, "load_copies", False):
            # copies of the flag, kept apart, one a group of the requantizer's lanes
            loads = [Signal(name=f"t_requant{g}", attrs={"ambert_replica": 1}) for g in range(len(rq.load))]
            m.d.sync += [x.eq(array.out_valid & s.u_last) for x in loads]
            m.d.comb += [rq.load[g].eq(x) for g, x in enumerate(loads)]
        o_wr = self.o_wr
        if s.write_q:
            # the output writes from flip-flops, so the requantizer's output and the word multiplexers do
            # not share a cycle with the way to the pool's write registers
            o_wr = PoolWrite(len(self.o_wr.addr), WB, self.subbanks).create(path=("o_wr_c",))
            wr_q = [Signal(len(Value.cast(x)), name=f"o_wr_q_{n}", reset_less=n != "en")
                    for x, n in ((o_wr.addr, "addr"), (o_wr.data, "data"), (o_wr.en, "en"))]
            m.d.sync += [q.eq(x) for q, x in zip(wr_q, (o_wr.addr, o_wr.data, o_wr.en))]
            m.d.comb += [x.eq(q) for q, x in zip(wr_q, (self.o_wr.addr, self.o_wr.data, self.o_wr.en))]
        if self.bit_serial:
            # the output address and the parameter buffer travel with the row
            m.d.comb += rq.tag.eq(Cat(s.t_optr, s.t_pbuf))
            self._write_lanes(m, rq, mode, o_wr)
        else:
            params = s.params
            pw = [Mux(s.t_pbuf, params[1][w], params[0][w]) for w in range(P)]
            for j in range(L):
                m.d.comb += [rq.bias[j].eq(lanes_of(pw[0:4], 32, j)), rq.m0[j].eq(lanes_of(pw[4:8], 32, j)),
                             rq.shift[j].eq(lanes_of(pw[8:9], 8, j))]
            o_addr = _delay(m, s.t_optr, rq.latency, "o_addr")
            self._write_rows(m, rq, mode, s.row_words, o_addr, o_wr, mode_copies=s.write_q)

    def _ring_delay(self, m, sigs, n, name):
        """``sigs`` delayed ``n`` cycles by a memory written every cycle and read ``n - 1`` slots ahead of
        the write: one read and one write a cycle instead of ``n`` copies (faster to simulate, and a small
        RAM rather than ``n`` x width flip-flops on an FPGA). The data carries no reset."""
        word = Cat(*sigs)
        # the compact layout's few cycles would make it flip-flops: on the small FPGA it is built for,
        # block RAM is what is left over
        attrs = {"ram_style": "block"} if self.compact_array else None
        m.submodules[name] = ring = memory.Memory(shape=unsigned(len(word)), depth=n, init=[], attrs=attrs)
        wr, rd = ring.write_port(), ring.read_port(transparent_for=())
        ptr = Signal(range(n), name=f"{name}_ptr")
        m.d.sync += ptr.eq(Mux(ptr == n - 1, 0, ptr + 1))
        m.d.comb += [wr.en.eq(1), wr.addr.eq(ptr), wr.data.eq(word),
                     rd.addr.eq(Mux(ptr == n - 1, 0, ptr + 1))]
        outs, at = [], 0
        for sig in sigs:
            outs.append(Signal.like(sig, name=f"{name}_{sig.name}"))
            m.d.comb += outs[-1].eq(rd.data[at:at + len(sig)])
            at += len(sig)
        return outs

    def _write_rows(self, m, rq, mode, row_words, o_addr, o_wr, mode_copies=False):
        """Write the requantizer's rows to the output region: whole rows, or a word a cycle."""
        WB = self.word_bits
        L = self.lanes
        out = [rq.out[j] for j in range(L)]
        w8 = Cat(*(o[:8] for o in out))
        w16 = Cat(*(o[:16] for o in out))
        w32 = Cat(*out)
        if self.subbanks == 1:
            # one word a cycle: the first straight from the requantizer, the later ones from a copy (the
            # requantizer overwrites its output a group at a time)
            o_rest = Signal(3 * WB, name="o_rest", reset_less=True)
            o_next, o_left = Signal.like(o_addr, name="o_next"), Signal(2, name="o_left")
            o_idx = Signal(2, name="o_idx")
            first = Mux(mode == Mode.INT8, w8, Mux(mode == Mode.INT16, w16, w32))
            rest = Mux(mode == Mode.INT16, w16[WB:], w32[WB:])
            if mode_copies:
                # the mode a copy a byte of the word, kept apart, each beside its byte's multiplexers, a
                # cycle late (it holds through a MATMUL)
                modes = [Signal(2, name=f"o_mode{k}", attrs={"ambert_replica": 1}) for k in range(L)]
                m.d.sync += [x.eq(mode) for x in modes]
                hi16, hi32 = w16[WB:], w32[WB:]

                def byte(v, k):
                    return v[8 * k: 8 * k + 8] if 8 * k < len(v) else Const(0, 8)
                first = Cat(*(Mux(modes[k] == Mode.INT8, byte(w8, k),
                                  Mux(modes[k] == Mode.INT16, byte(w16, k), byte(w32, k))) for k in range(L)))
                rest = Cat(*(Mux(modes[k % L] == Mode.INT16, byte(hi16, k), byte(hi32, k)) for k in range(3 * L)))
            with m.If(rq.out_valid):
                m.d.comb += [o_wr.addr.eq(o_addr), o_wr.en.eq(1), o_wr.data[0].eq(first)]
                m.d.sync += [o_rest.eq(rest), o_next.eq(o_addr + 1), o_left.eq(row_words - 1), o_idx.eq(0)]
            with m.Elif(o_left != 0):
                m.d.comb += [o_wr.addr.eq(o_next), o_wr.en.eq(1),
                             o_wr.data[0].eq(o_rest.word_select(o_idx, WB))]
                m.d.sync += [o_next.eq(o_next + 1), o_left.eq(o_left - 1), o_idx.eq(o_idx + 1)]
        else:
            m.d.comb += o_wr.addr.eq(o_addr)
            for sub in range(SUBBANKS):
                m.d.comb += o_wr.data[sub].eq(Mux(mode == Mode.INT8, w8,
                                                  Mux(mode == Mode.INT16, w16.word_select(sub % 2, WB),
                                                      w32.word_select(sub, WB))))
            with m.If(rq.out_valid):
                with m.Switch(mode):
                    with m.Case(Mode.INT8):
                        m.d.comb += o_wr.en.eq(Const(1, 4) << o_addr[:2])
                    with m.Case(Mode.INT16):
                        m.d.comb += o_wr.en.eq(Mux(o_addr[1], 0b1100, 0b0011))
                    with m.Default():
                        m.d.comb += o_wr.en.eq(0b1111)

    def _write_lanes(self, m, rq, mode, o_wr):
        """Write the bit-serial requantizer's lanes as they come: each lane's int8, int16 or int32 joins
        the earlier lanes' in a shift register, and a pool word is written when it is full (every lane
        with int32, every ``lanes // 2`` with int16, the whole row with int8), at the row's address
        (its tag) plus the words written before."""
        WB, L = self.word_bits, self.lanes
        sr = Signal(WB - 8, name="o_lanes", reset_less=True)
        o_cnt = Signal(2, name="o_cnt")                     # words of the row written
        in_word = Signal(range(L), name="o_in_word")       # lanes in the word being filled
        piece = Mux(mode == Mode.INT8, Cat(sr, rq.out[:8]),
                    Mux(mode == Mode.INT16, Cat(sr, rq.out[:16])[8:], Cat(sr, rq.out)[24:]))
        per_word = Mux(mode == Mode.INT8, L, Mux(mode == Mode.INT16, L // 2, L // 4))
        full = in_word + 1 == per_word
        o_addr = rq.out_tag[:len(o_wr.addr)] + o_cnt
        with m.If(rq.out_valid):
            m.d.sync += [sr.eq(piece[8:]), in_word.eq(Mux(full, 0, in_word + 1))]
            with m.If(full):
                m.d.comb += o_wr.addr.eq(o_addr)
                for sub in range(self.subbanks):
                    m.d.comb += o_wr.data[sub].eq(piece)
                m.d.comb += o_wr.en.eq(1 if self.subbanks == 1 else Const(1, 4) << o_addr[:2])
                m.d.sync += o_cnt.eq(Mux(rq.out_lane == L - 1, 0, o_cnt + 1))
