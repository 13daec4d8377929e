"""The MATMUL engine: walks the tiles of one GEMM through the array, the accumulators and the epilogue."""

from amaranth import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from .array import SystolicArray
from .bufpool import SUBBANKS
from .isa import MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, Mode
from .requant import BitSerialRequantizer, Requantizer

__all__ = ["MatmulEngine", "mode_words"]


def mode_words(mode):
    """Pool words per output row for a MATMUL mode signal (hw.isa.MODE_WORDS, as logic)."""
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
    """Run ``out = requant(A @ W.T + bias)`` for operands laid out in the pool as ``hw.isa`` packs them.

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
    """

    def __init__(self, lanes, addr_bits, acc_depth, requant_lanes=None, serial_mul_bits=None, subbanks=SUBBANKS,
                 compact_array=False, read_latency=1, weight_write_latency=0, product_latency=1, hop_latency=1):
        if read_latency not in (1, 2, 3, 4, 5):
            raise ValueError(f"read_latency must be 1 to 5, not {read_latency!r}")
        self.lanes = lanes
        self.read_latency = read_latency
        self.acc_depth = acc_depth
        self.word_bits = 8 * lanes
        self.subbanks = subbanks
        self.compact_array = compact_array
        self.array = SystolicArray(lanes, lanes, paired=compact_array, write_latency=weight_write_latency,
                                   product_latency=product_latency, hop_latency=hop_latency)
        # bit-serial: one lane at a time, the parameters read from a memory as it needs them
        self.bit_serial = serial_mul_bits == 1
        if self.bit_serial:
            if requant_lanes != 1:
                raise ValueError(f"a bit-serial requantizer takes one lane at a time: requant_lanes must be 1, "
                                 f"not {requant_lanes!r}")
            self.requant = BitSerialRequantizer(lanes, tag_bits=addr_bits + 1)
        else:
            # (read latency 4 or 5, a large FPGA's: the row's copy loaded by enables a group of lanes each)
            copied = requant_lanes not in (None, lanes) or serial_mul_bits is not None
            self.requant = Requantizer(lanes, requant_lanes, serial_mul_bits, product_latency,
                                       load_copies=read_latency >= 4 and copied)
        if subbanks == 1 and self.requant.steps < 4:
            raise ValueError(f"a pool of one memory a bank takes an output row in up to 4 cycles: the "
                             f"requantizer must take >= 4 cycles a row, not {self.requant.steps} (requant_lanes)")
        super().__init__({
            "start": In(1),
            "a_addr": In(addr_bits), "w_addr": In(addr_bits), "p_addr": In(addr_bits), "o_addr": In(addr_bits),
            "m": In(16), "k_tiles": In(16), "n_tiles": In(16), "mode": In(2),
            "busy": Out(1), "done": Out(1), "issuing": Out(1),
            "a_rd": Out(PoolRead(addr_bits, self.word_bits)),
            "w_rd": Out(PoolRead(addr_bits, self.word_bits)),
            "o_wr": Out(PoolWrite(addr_bits, self.word_bits, subbanks)),
        })

    def elaborate(self, platform):
        m = Module()
        L, WB = self.lanes, self.word_bits
        P = PARAM_WORDS_PER_LANE_GROUP
        m.submodules.array = array = self.array
        m.submodules.requant = rq = self.requant
        lat = array.latency
        extra = self.read_latency - 1   # cycles the pool's reads take beyond one
        # (read latency 4 or 5, a large FPGA's: the accumulator memories' output registered too, a row's sums
        # read a cycle earlier)
        acc_q = write_q = self.read_latency >= 4
        gap = lat + 6 + acc_q           # a tile starts >= this long after the previous one (accumulator RAW)
        load_margin = lat + 8           # the idle weight bank and param buffer are free this long after a start

        def delay(sig, n, name):
            for k in range(n):
                nxt = Signal.like(sig, name=f"{name}_d{k}")
                m.d.sync += nxt.eq(sig)
                sig = nxt
            return sig

        def ring_delay(sigs, n, name):
            # the same delay as n registers, from a memory written every cycle and read n - 1 slots ahead
            # of the write (one read, one write a cycle instead of n copies: faster to simulate, and a
            # small RAM rather than n x width flip-flops on an FPGA); the data carries no reset
            word = Cat(*sigs)
            # (the compact layout's few cycles would make it flip-flops: on the small FPGA it is built
            # for, block RAM is what is left over)
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

        acc_mem = memory.Memory(shape=unsigned(32 * L), depth=self.acc_depth, init=[])
        m.submodules.acc_mem = acc_mem
        acc_rd = acc_mem.read_port()
        acc_wr = acc_mem.write_port()

        # latched arguments
        a_base = Signal.like(self.a_addr)
        w_ptr, p_ptr = Signal.like(self.w_addr), Signal.like(self.p_addr)
        # the small-FPGA variant's counters as wide as the checked arguments can be (M <= acc_depth; a tile
        # count, a region size in words, at most the pool's): fewer logic cells than 16 bits. (Elsewhere
        # 16: the narrower ones cost the 16 x 16 simulator 4%.)
        row_bits = self.acc_depth.bit_length() if self.bit_serial else 16
        tile_bits = min(16, len(self.a_addr) + 1) if self.bit_serial else 16
        rows, kt_n, nt_n, mode = Signal(row_bits), Signal(tile_bits), Signal(tile_bits), Signal(2)
        row_words = Signal(3)
        m.d.comb += row_words.eq(mode_words(mode))
        rows_words = Mux(row_words == 4, rows << 2, Mux(row_words == 2, rows << 1, rows))   # no multiplier

        # a bit-serial requantizer reads a row's parameters while it works on the row, up to its latency
        # after the row left the array: the parameter buffer is free that much later than the weight bank
        param_margin = load_margin + rq.latency if self.bit_serial else load_margin
        top = max(lat + 15, param_margin)
        since = Signal(range(top + 1))           # cycles since the current tile started, saturating
        m.d.sync += since.eq(Mux(since == top, since, since + 1))

        # --- the loader: the next tile's weights into the idle bank, its params at an n-tile boundary ---
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
        for k in range(extra):
            later = (ld_iss_valid, ld_iss_idx, ld_iss_pbuf)
            ld_iss_valid, ld_iss_idx, ld_iss_pbuf = Signal(name=f"ld_iss{k}_valid"), Signal.like(ld_idx,
                name=f"ld_iss{k}_idx"), Signal(name=f"ld_iss{k}_pbuf")
            m.d.sync += [x.eq(y) for x, y in zip(later, (ld_iss_valid, ld_iss_idx, ld_iss_pbuf))]
            ld_in_flight.append(ld_iss_valid)
        # a weight word is in the array a cycle after it arrives when the array registers its writes (and
        # a parameter word in its buffer: see below)
        if weight_write_latency := self.array.write_latency:
            ld_wr_valid = ld_rd_valid
            for k in range(weight_write_latency):
                landing = Signal(name=f"ld_wr{k}_valid")
                m.d.sync += landing.eq(ld_wr_valid)
                ld_in_flight.append(landing)
                ld_wr_valid = landing
        if not self.bit_serial:
            # (no reset: written before a row reads them; the accelerator's reset fanned out to their
            # 2 x 9 x 96 flip-flops was the 12 x 12's critical path at 75 MHz)
            params = [[Signal(WB, name=f"param{b}_{w}", reset_less=True) for w in range(P)] for b in range(2)]

        # the loader's tile is a last k-tile; n-tiles follow it. Registered a cycle late: they are read
        # when a load ends, at least L + 2 cycles after the counters last moved (an increment and compare
        # in one cycle was the UP5K build's critical path, and the ECP5 12 x 12's on into the counters)
        ld_last_k, ld_more_n = Signal(), Signal()
        m.d.sync += [ld_last_k.eq(ld_kt + 1 == kt_n), ld_more_n.eq(ld_nt + 1 != nt_n)]
        m.d.sync += ld_iss_valid.eq(0)
        # whether the loader reads this cycle, and whether a weight word (else a parameter word): flags set
        # a cycle ahead, so the pool's address comes from flip-flops through one multiplexer (the compare
        # of ld_idx against the load's length, on into the bank multiplexers and the block RAMs' address
        # inputs, was the ECP5 8 x 8 build's critical path)
        ld_reading, ld_on_w = Signal(), Signal()
        # (the read addresses whatever the state: only the enables decide, so the pool's address
        # multiplexers see no more logic in front of them than the enables')
        m.d.comb += self.w_rd.addr.eq(Mux(ld_on_w, w_ptr, p_ptr))
        with m.If(ld_go):
            m.d.sync += [ld_busy.eq(1), ld_idx.eq(0), ld_params.eq(ld_kt == 0), ld_reading.eq(1), ld_on_w.eq(1)]
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
                # the tile is ready; step to the following tile (every word in flight counted: a load of
                # fewer words than the read latency has none arriving yet when its reads end)
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
                # registered like the array's weight writes: the pool's bank multiplexer on into the 2 x 9
                # words of parameter flip-flops was the ECP5 12 x 12's critical path. (A copy of the
                # array's column registers of the same word, kept apart: merged, the parameters came from
                # one PE's, across the die; see hw.array.)
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
        # counts up from 0 after a tile starts and saturates above them all); the comparison against a
        # multiplexed margin was the UP5K build's critical path
        restart, past_load, past_param, past_gap = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [past_load.eq(~restart & (since >= load_margin - 1)),
                     past_param.eq(~restart & (since >= param_margin - 1)),
                     past_gap.eq(~restart & (since >= gap - 1))]
        margin_passed = Mux(ld_kt == 0, past_param, past_load) if param_margin != load_margin else past_load
        with m.If(ld_wait & margin_passed & ~ld_busy):
            m.d.comb += ld_go.eq(1)
            m.d.sync += ld_wait.eq(0)

        # --- the feeder: one activation row per cycle ---------------------------------------------------
        fd_row, fd_kt, fd_nt = Signal(row_bits), Signal(tile_bits), Signal(tile_bits)
        fd_sel, fd_started, fd_last_tile = Signal(), Signal(), Signal()
        a_tile, a_ptr = Signal.like(a_base), Signal.like(a_base)
        m.d.comb += self.a_rd.addr.eq(a_ptr)        # (as the loader's: only the enable decides)
        o_tile, o_ptr = Signal.like(self.o_addr), Signal.like(self.o_addr)
        # (+3: the last words of a row written one a cycle; +1: the writes registered)
        drain_end = lat + rq.latency + 6 + extra + (3 if self.subbanks == 1 else 0) + write_q
        drain = Signal(range(max(lat + rq.latency + 11, drain_end + 1)))
        # the feeder's decisions come from registers, each set a cycle ahead (computed from the counters,
        # they made the UP5K build's critical path after the sequencer's, and the ECP5 12 x 12's): compared
        # with the counts less two, registered at the start (a count of one never matches, as a counter
        # is never -1)
        last_k, row_last, nt_last = Signal(), Signal(), Signal()
        kt_m2, rows_m2, nt_m2 = Signal.like(kt_n), Signal.like(rows), Signal.like(nt_n)

        # rows of a last k-tile go to the requantizer: no faster than it takes them
        # (the pace runs across tile boundaries: a tile may start the cycle after the last one's last row)
        issue = Signal()
        pace = Signal(range(rq.steps))          # cycles until the requantizer takes another row
        # (with the bit-serial requantizer no row at all does: it reads its row from t_sum for that long)
        # ("pace is zero" a flip-flop of its own: the compare on into the feeder's counters' enables was
        # a path of the ECP5 12 x 12 at 100 MHz)
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
                # of all these registers (the ECP5 8 x 8 build's critical path); nothing reads them idle
                m.d.sync += [a_base.eq(self.a_addr), w_ptr.eq(self.w_addr), p_ptr.eq(self.p_addr),
                             rows.eq(self.m), kt_n.eq(self.k_tiles), nt_n.eq(self.n_tiles),
                             mode.eq(self.mode),
                             ld_kt.eq(0), ld_nt.eq(0), ld_bank.eq(0), ld_ready.eq(0), ld_pending.eq(1),
                             fd_kt.eq(0), fd_nt.eq(0), fd_sel.eq(0), fd_started.eq(0),
                             a_tile.eq(self.a_addr), o_tile.eq(self.o_addr)]
                m.d.sync += [last_k.eq(self.k_tiles == 1), kt_m2.eq(self.k_tiles - 2), rows_m2.eq(self.m - 2),
                             nt_last.eq(self.n_tiles == 1), nt_m2.eq(self.n_tiles - 2)]
                with m.If(self.start):
                    m.next = "LOAD_FIRST"
            with m.State("LOAD_FIRST"):
                m.d.comb += ld_go.eq(1)
                m.next = "WAIT_TILE"
            with m.State("WAIT_TILE"):
                with m.If(ld_ready & ~ld_busy & (~fd_started | past_gap)):
                    m.d.sync += [ld_ready.eq(0), fd_started.eq(1), since.eq(0), fd_row.eq(0),
                                 a_ptr.eq(a_tile), o_ptr.eq(o_tile), ld_wait.eq(ld_pending),
                                 fd_last_tile.eq(last_k & nt_last), row_last.eq(rows == 1)]
                    m.d.comb += restart.eq(1)
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(issue & last_k):
                    m.d.sync += [pace.eq(rq.steps - 1), pace_zero.eq(rq.steps == 1)]
                with m.If(issue):
                    m.d.comb += [self.issuing.eq(1), self.a_rd.en.eq(1)]
                    m.d.sync += [s1_valid.eq(1), s1_zero.eq(fd_kt == 0), s1_last.eq(last_k),
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
                            m.d.sync += drain.eq(0)
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
        m.d.sync += [s2_a.eq(self.a_rd.data), s2_sel.eq(delay(s1_sel, extra, "s1_sel")),
                     s2_valid.eq(delay(s1_valid, extra, "s1_valid"))]
        m.d.comb += [array.a.eq(s2_a), array.sel.eq(s2_sel), array.valid.eq(s2_valid)]

        # --- drain: the array's sums plus the accumulators, back to them or through the epilogue --------
        # The partial sums are continued here, at the array's output, not fed into its top row: no skew
        # registers for 32-bit sums (32 x L(L+1)/2 flip-flops) and one adder a column. The row's
        # accumulators are read the cycle before it leaves the array (p_), added as it leaves (u_), and
        # the sum is registered (t_) before it is written back or requantized.
        p_info = [s1_last, s1_row, s1_optr, s1_pbuf, s1_zero]
        if self.read_latency >= 3:
            # (a large FPGA's: the ring's block RAM output registered, so that the accumulator memories'
            # address comes from flip-flops placed near them)
            p_last, p_row, p_optr, p_pbuf, p_zero = (delay(p, 1, f"p_{n}") for p, n in zip(
                ring_delay(p_info, lat + extra - 1 - acc_q, "p_info"), ("last", "row", "optr", "pbuf", "zero")))
        else:
            p_last, p_row, p_optr, p_pbuf, p_zero = ring_delay(p_info, lat + extra, "p_info")
        m.d.comb += acc_rd.addr.eq(p_row)
        acc_in = acc_rd.data
        if acc_q:
            # the sums read a cycle ahead into flip-flops: the block RAMs' 4.5 ns clock-to-out, then a
            # 32-bit add, was the 12 x 12's critical path at 100 MHz
            acc_in = Signal.like(acc_rd.data, name="acc_q", reset_less=True)
            m.d.sync += acc_in.eq(acc_rd.data)
            p_last, p_row, p_optr, p_pbuf, p_zero = (delay(p, 1, f"p_{n}_q") for p, n in zip(
                (p_last, p_row, p_optr, p_pbuf, p_zero), ("last", "row", "optr", "pbuf", "zero")))
        u_last, u_row, u_optr, u_pbuf, u_zero = (Signal.like(p, name=f"u_{n}") for p, n in zip(
            (p_last, p_row, p_optr, p_pbuf, p_zero), ("last", "row", "optr", "pbuf", "zero")))
        m.d.sync += [u.eq(p) for u, p in zip((u_last, u_row, u_optr, u_pbuf, u_zero),
                                             (p_last, p_row, p_optr, p_pbuf, p_zero))]
        t_valid, t_last, t_row, t_optr, t_pbuf = Signal(), Signal(), Signal.like(u_row), Signal.like(u_optr), Signal()
        t_sum = Signal(data.ArrayLayout(unsigned(32), L), name="t_sum", reset_less=True)
        # (a row for the requantizer flagged from a flip-flop of its own: its valid loads the requantizer's
        # copy of the row, over a thousand flip-flops on the ECP5 12 x 12)
        t_requant = Signal()
        m.d.sync += [t_valid.eq(array.out_valid), t_last.eq(u_last), t_row.eq(u_row), t_optr.eq(u_optr),
                     t_pbuf.eq(u_pbuf), t_requant.eq(array.out_valid & u_last)]
        zeros = [u_zero] * L
        if acc_q:
            # (a copy of the flag a column, kept apart: one flip-flop to the 12 x 32 adders' inputs was a
            # path of the 12 x 12 at 100 MHz)
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

        def lanes_of(words, bits, j):
            return Cat(*words)[bits * j: bits * j + bits]
        m.d.comb += [rq.acc.eq(t_sum), rq.valid.eq(t_requant), rq.mode.eq(mode)]
        if getattr(rq, "load_copies", False):
            # (copies of the flag, kept apart, one a group of the requantizer's lanes)
            loads = [Signal(name=f"t_requant{g}", attrs={"ambert_replica": 1}) for g in range(len(rq.load))]
            m.d.sync += [x.eq(array.out_valid & u_last) for x in loads]
            m.d.comb += [rq.load[g].eq(x) for g, x in enumerate(loads)]
        o_wr = self.o_wr
        if write_q:
            # the output writes from flip-flops: the requantizer's output through the word multiplexers on
            # into the pool's write registers across the die was the 12 x 12's critical path at 100 MHz
            o_wr = PoolWrite(len(self.o_wr.addr), WB, self.subbanks).create(path=("o_wr_c",))
            wr_q = [Signal(len(Value.cast(x)), name=f"o_wr_q_{n}", reset_less=n != "en")
                    for x, n in ((o_wr.addr, "addr"), (o_wr.data, "data"), (o_wr.en, "en"))]
            m.d.sync += [q.eq(x) for q, x in zip(wr_q, (o_wr.addr, o_wr.data, o_wr.en))]
            m.d.comb += [x.eq(q) for q, x in zip(wr_q, (self.o_wr.addr, self.o_wr.data, self.o_wr.en))]
        if self.bit_serial:
            # the output address and the parameter buffer travel with the row
            m.d.comb += rq.tag.eq(Cat(t_optr, t_pbuf))
            self._write_lanes(m, rq, mode, o_wr)
        else:
            # the parameters of the row's n-tile: bias in words 0-3, m0 in 4-7, shifts in 8 (hw.isa)
            pw = [Mux(t_pbuf, params[1][w], params[0][w]) for w in range(P)]
            for j in range(L):
                m.d.comb += [rq.bias[j].eq(lanes_of(pw[0:4], 32, j)), rq.m0[j].eq(lanes_of(pw[4:8], 32, j)),
                             rq.shift[j].eq(lanes_of(pw[8:9], 8, j))]
            o_addr = delay(t_optr, rq.latency, "o_addr")
            self._write_rows(m, rq, mode, row_words, o_addr, o_wr, mode_copies=write_q)
        return m

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
                # (the mode a copy a byte of the word, kept apart, a cycle late (it holds through a
                # MATMUL): the engine's one mode register fanned out to these multiplexers across the die
                # was the 12 x 12's critical path at 90 MHz)
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
