"""The weight-stationary systolic array."""

from amaranth import Cat, Module, Signal, signed, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from .mac import ProductPair
from .pe import ProcessingElement

__all__ = ["SystolicArray"]


class SystolicArray(wiring.Component):
    """``rows`` x ``cols`` int8 PEs; computes one output row per cycle: ``out[j] = sum_i a[i] * W[i][j]``
    (int32, wrapping) with the weights of bank ``sel``.

    Inputs, presented together each cycle (no handshake; the array never stalls):
    ``a`` (``rows`` x int8), ``sel`` (weight bank), ``valid``. Partial sums are continued outside, at
    the output (the engine adds its accumulators there): no input skew of 32-bit sums. (They stay 32
    bits wide inside the array, although 16 + ceil(log2(rows)) would hold them: Verilator sign-extends
    every odd-width signed sum, and at 16 x 16 that cost 10% of the simulator's speed.) Skewing is
    internal: the matching ``out`` (``cols`` x int32) appears with ``out_valid`` exactly ``latency = rows
    + cols + product_latency`` cycles later (1: the PEs' product register), all columns aligned.

    ``paired`` (default False) is the layout for a small FPGA, where logic cells are what runs out: the
    products of neighbouring PEs two by two in one :class:`ambert.hw.mac.ProductPair` (one DSP block per pair
    on an iCE40), each row's activation broadcast to all its columns instead of passed along (no output
    deskew then; a 4 x 4 array at tens of MHz needs no pipelined fan-out), each row's two weight banks
    in one block RAM read a cycle ahead of its activation (``latency = rows + 2``), and partial sums
    16 + ceil(log2(rows)) bits wide. Same results.

    Weights: ``w_we`` writes ``w_data`` (``cols`` x int8) into row ``w_row`` of bank ``w_bank``,
    ``write_latency`` (0, 1 or 2) cycles later: 1 registers the write once a column (its weight byte, its
    bank and a decoded enable for each row), so that on an FPGA each column's PEs take it from
    flip-flops placed beside them rather than from one enable routed to every PE; 2 registers it once
    more before that, decoded (the decode's way to the far columns in a cycle of its own). (Those registers
    carry the ``ambert_replica`` attribute: a synthesis script marks them ``keep``, else Yosys merges
    the columns' identical enables back into one.) Writing bank b is safe once every row issued with
    ``sel == b`` has been out for ``latency`` cycles; a row issued with ``sel == b`` sees a write to bank
    b issued ``write_latency`` cycles before it or earlier.

    ``product_latency`` (1 or 2; the PEs', :class:`ambert.hw.pe.ProcessingElement`) 2 registers each PE's operands
    before its multiply too (on an ECP5, the DSP block's own registers): the latency is a cycle longer,
    ``rows + cols + 2``, nothing else. ``hop_latency`` (1 or 2) is how many cycles an activation takes
    from a column's PE to the next column's: 2 puts a register between them (on a large FPGA, whose DSP
    blocks for neighbouring columns may lie far apart), so ``latency = rows + 2 * cols +
    product_latency`` (the output deskew is longer to match, a register more for the last column's
    sums too), nothing else.
    """

    def __init__(self, rows, cols, paired=False, write_latency=0, product_latency=1, hop_latency=1):
        for name, v in (("rows", rows), ("cols", cols)):
            if not isinstance(v, int) or not 2 <= v <= 32:
                raise ValueError(f"{name} must be an int in [2, 32], not {v!r}")
        if paired and cols % 2:
            raise ValueError(f"paired products need an even number of columns, not {cols}")
        if write_latency not in (0, 1, 2):
            raise ValueError(f"write_latency must be 0, 1 or 2, not {write_latency!r}")
        if paired and write_latency:
            raise ValueError("paired products keep their weights in a block RAM a row: write_latency must be 0")
        if product_latency not in (1, 2):
            raise ValueError(f"product_latency must be 1 or 2, not {product_latency!r}")
        if paired and product_latency != 1:
            raise ValueError("paired products are registered once, in their DSP block: product_latency must be 1")
        if hop_latency not in (1, 2):
            raise ValueError(f"hop_latency must be 1 or 2, not {hop_latency!r}")
        if paired and hop_latency != 1:
            raise ValueError("paired products broadcast each row's activation: hop_latency must be 1")
        self.rows, self.cols, self.paired = rows, cols, paired
        self.write_latency, self.product_latency, self.hop_latency = write_latency, product_latency, hop_latency
        # (with paired products, activations are broadcast along each row: no column skew to undo)
        # (two hops: the sums leave through a register more, as the activations come)
        self.latency = rows + 2 if paired else rows + hop_latency * cols + product_latency
        super().__init__({
            "a": In(data.ArrayLayout(signed(8), rows)),
            "sel": In(1),
            "valid": In(1),
            "out": Out(data.ArrayLayout(signed(32), cols)),
            "out_valid": Out(1),
            "w_data": In(data.ArrayLayout(signed(8), cols)),
            "w_row": In(range(rows)),
            "w_bank": In(1),
            "w_we": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        R, C = self.rows, self.cols
        paired = self.paired
        # paired: the partial sums as wide as R products need, sign-extended at the output
        P = 16 + (R - 1).bit_length() if paired else 32
        pes = [[ProcessingElement(external_product=paired, psum_bits=P, external_weight=paired,
                                  product_latency=self.product_latency) for _ in range(C)] for _ in range(R)]
        if paired:
            for i in range(R):
                for j in range(0, C, 2):
                    m.submodules[f"mac_{i}_{j}"] = mac = ProductPair()
                    left, right = pes[i][j], pes[i][j + 1]
                    m.d.comb += [mac.a0.eq(left.mul_a), mac.b0.eq(left.mul_w), left.mul_p.eq(mac.p0),
                                 mac.a1.eq(right.mul_a), mac.b1.eq(right.mul_w), right.mul_p.eq(mac.p1)]
        row_we_of = []
        for i in range(R):
            row_we = Signal(name=f"w_we_row{i}")      # decoded once a row, not once a PE
            m.d.comb += row_we.eq(self.w_we & (self.w_row == i))
            row_we_of.append(row_we)
        w_data, w_bank = self.w_data, self.w_bank
        if self.write_latency == 2:
            # the write registered once before the columns' copies, each row's enable decoded, so the
            # decode does not travel with the write to the far columns; each row's enable and the bank a
            # copy every four columns, each beside the columns it feeds
            groups = -(-C // 4)
            replica = {"ambert_replica": 1} if groups > 1 else {}
            w_data = Signal.like(self.w_data, name="w_data_q", reset_less=True)
            w_bank = [Signal(name=f"w_bank_q{g}", reset_less=True, attrs=replica) for g in range(groups)]
            row_we_q = [[Signal(name=f"w_we_row{i}_q{g}", reset_less=True, attrs=replica) for g in range(groups)]
                        for i in range(R)]
            m.d.sync += [w_data.eq(self.w_data)] + [x.eq(self.w_bank) for x in w_bank]
            m.d.sync += [x.eq(we) for qs, we in zip(row_we_q, row_we_of) for x in qs]
            group_of = [j // 4 for j in range(C)]
            row_we_of = row_we_q
        else:
            w_bank = [w_bank]
            row_we_of = [[we] for we in row_we_of]
            group_of = [0] * C
        if self.write_latency:
            # column j's copy of the write: its byte, the bank and every row's enable
            replica = {"ambert_replica": 1}
            # (the data bytes marked too: the engine keeps a copy of the whole word, for its parameters,
            # that Yosys would otherwise merge into these, beside one column's PEs)
            col_data = [Signal(signed(8), name=f"w_data_col{j}", reset_less=True, attrs=replica) for j in range(C)]
            col_bank = [Signal(name=f"w_bank_col{j}", reset_less=True, attrs=replica) for j in range(C)]
            # the enables without reset, as the data: a write in flight at a reset lands in a weight bank
            # that the next tile's load writes anyway, and the reset net stays off the row decode
            col_we = [[Signal(name=f"w_we_row{i}_col{j}", reset_less=True, attrs=replica) for j in range(C)]
                      for i in range(R)]
            m.d.sync += [col_data[j].eq(w_data[j]) for j in range(C)]
            m.d.sync += [col_bank[j].eq(w_bank[group_of[j]]) for j in range(C)]
            m.d.sync += [col_we[i][j].eq(row_we_of[i][group_of[j]]) for i in range(R) for j in range(C)]
        for i in range(R):
            for j in range(C):
                m.submodules[f"pe_{i}_{j}"] = pe = pes[i][j]
                if paired:
                    continue
                if self.write_latency:
                    m.d.comb += [pe.w_data.eq(col_data[j]), pe.w_bank.eq(col_bank[j]), pe.w_we.eq(col_we[i][j])]
                else:
                    m.d.comb += [pe.w_data.eq(self.w_data[j]), pe.w_bank.eq(self.w_bank),
                                 pe.w_we.eq(row_we_of[i][0])]

        def delay(sig, n, shape, name, reset_less=True):
            # n registers: the input skew of row i / column j, the output deskew (data: no reset)
            for k in range(n):
                nxt = Signal(shape, name=f"{name}_d{k}", reset_less=reset_less)
                m.d.sync += nxt.eq(sig)
                sig = nxt
            return sig

        # row i of activations (with its bank select) enters i cycles late
        for i in range(R):
            # the activation and its bank select skewed as one register (half the copies in simulation)
            a_sel = delay(Cat(self.a[i], self.sel), i, unsigned(9), f"a_sel{i}")
            a_i, sel_i = a_sel[:8].as_signed(), a_sel[8]
            if paired:
                # the row's weights of bank sel read as the activation waits a cycle, then all to every PE
                wmem = memory.Memory(shape=unsigned(8 * C), depth=2, init=[], attrs={"ram_style": "block"})
                m.submodules[f"weights{i}"] = wmem
                wr, rd = wmem.write_port(), wmem.read_port(transparent_for=())
                m.d.comb += [wr.en.eq(row_we_of[i][0]), wr.addr.eq(self.w_bank), wr.data.eq(self.w_data),
                             rd.addr.eq(sel_i)]
                a_next = delay(a_i, 1, signed(8), f"a{i}")
                for j in range(C):
                    m.d.comb += [pes[i][j].a_in.eq(a_next), pes[i][j].sel_in.eq(0),
                                 pes[i][j].weight.eq(rd.data[8 * j: 8 * j + 8])]
                continue
            m.d.comb += [pes[i][0].a_in.eq(a_i), pes[i][0].sel_in.eq(sel_i)]
            for j in range(1, C):
                a_prev, sel_prev = pes[i][j - 1].a_out, pes[i][j - 1].sel_out
                if self.hop_latency == 2:
                    # (one register more between the columns, activation and select as one)
                    hop = delay(Cat(a_prev, sel_prev), 1, unsigned(9), f"a_hop{i}_{j}")
                    a_prev, sel_prev = hop[:8].as_signed(), hop[8]
                m.d.comb += [pes[i][j].a_in.eq(a_prev), pes[i][j].sel_in.eq(sel_prev)]
        for j in range(C):
            m.d.comb += pes[0][j].psum_in.eq(0)
            for i in range(1, R):
                m.d.comb += pes[i][j].psum_in.eq(pes[i - 1][j].psum_out)
            if paired:
                m.d.comb += self.out[j].eq(pes[R - 1][j].psum_out)
            else:
                # column j leaves row R-1 at R + hop_latency * j + product_latency; hold it
                # hop_latency * (C - j) more cycles so all leave together (the last column's sums too then
                # cross to the array's edge in two hops)
                hold = self.hop_latency * (C - j)
                m.d.comb += self.out[j].eq(delay(pes[R - 1][j].psum_out, hold, signed(P), f"out{j}"))
        m.d.comb += self.out_valid.eq(delay(self.valid, self.latency, unsigned(1), "valid", reset_less=False))
        return m
