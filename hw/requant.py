"""The requantization epilogue on each output column."""

from functools import partial
from types import SimpleNamespace

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ambert.proto.contract import INT8_MAX, INT8_MIN, INT16_MAX, INT16_MIN, REQUANT_SHIFT_MAX
from ambert.proto.isa import Mode

from .mac import registered_product

__all__ = ["Requantizer"]


def _lane_register(j, shape, name):
    """A data register of lane ``j`` (``<name><j>``): no reset, only the valid flags have one."""
    return Signal(shape, name=f"{name}{j}", reset_less=True)


def _saturate(m, res, value, bypass, mode, by_bits=False):
    """``res`` = ``value`` saturated to int8 or int16 per ``mode``, or ``bypass`` in the int32 mode.

    ``by_bits``: a value fits int8 (int16) when its bits from 7 (15) up are all equal, else its sign picks
    the bound: the same as comparing it with the bounds, but trees of gates rather than two carry chains
    as long as the value (for the 64-bit one, on a large FPGA; on an iCE40 a narrow value's compare,
    along its fast carry chain, is the quicker).
    """
    if by_bits:
        above = [value[7:], value[15:]]
        fits = Mux(mode == Mode.INT8, above[0].all() | ~above[0].any(), above[1].all() | ~above[1].any())
    lo = Mux(mode == Mode.INT8, INT8_MIN, INT16_MIN)
    hi = Mux(mode == Mode.INT8, INT8_MAX, INT16_MAX)
    with m.If(mode == Mode.INT32):
        m.d.comb += res.eq(bypass)
    if by_bits:
        with m.Elif(fits):
            m.d.comb += res.eq(value)
        with m.Elif(value[-1]):
            m.d.comb += res.eq(lo)
        with m.Else():
            m.d.comb += res.eq(hi)
    else:
        with m.Elif(value < lo):
            m.d.comb += res.eq(lo)
        with m.Elif(value > hi):
            m.d.comb += res.eq(hi)
        with m.Else():
            m.d.comb += res.eq(value)


class Requantizer(wiring.Component):
    """``lanes`` columns of ``out = sat((acc + bias) * m0 + 2**(shift-1)) >> shift)``, as the contract's
    ``ref_gemm(..., bias)`` followed by ``ref_requant`` (one rounding, half toward +inf).

    ``mode`` (see :class:`ambert.proto.isa.Mode`) picks int8 or int16 saturation, or the int32 bypass that returns
    ``acc + bias`` unrounded. Everything presented with ``valid`` (the accumulator, the per-lane ``bias``,
    ``m0`` in [0, 2**31) and ``shift`` in [0, ``REQUANT_SHIFT_MAX``], the mode) travels down the pipeline
    together, so the
    parameters may change with every row. ``acc + bias`` must fit int32 (the contract guarantees it).

    ``group`` lanes (a divisor of ``lanes``; default all) go through the datapath a cycle: with fewer, a
    row takes ``lanes // group`` passes through one narrower datapath (a small FPGA has too few
    multipliers for one per lane). ``digit_bits`` (4, 8 or 16; default None: one 32 x 31 multiply a
    cycle, as four 16 x 16 partial products) makes the product digit-serial, ``digits = ceil(31 /
    digit_bits)`` cycles of a 32 x ``digit_bits`` multiply each, in logic: for an FPGA whose DSP blocks
    all go to the array. A row takes ``steps = lanes // group * digits`` cycles, and rows must come at
    least ``steps`` cycles apart.
    Latency: ``latency`` cycles from ``valid`` to ``out_valid``: 6 for a full-width datapath (bias, the
    partial products, the product's halves, the rounding sum, the shift, the saturation), ``6 + steps``
    for a narrower one (the row is copied first, and goes through from the copy), ``5 + steps`` with a
    digit-serial product; ``out`` holds the row from then until the next row's first group
    lands, one cycle later at the earliest. ``product_latency`` 2 (default 1) gives the full-width
    partial products two cycles, their operands registered and then the products (on an ECP5 each
    wholly inside a MULT18X18D: :func:`ambert.hw.mac.registered_product`), and the shift two, by a multiple of 8
    and then by the rest: two cycles more of latency (no effect with ``digit_bits``). ``load_copies``
    (with several steps a row): an input ``load`` of ``lanes // group`` copies of ``valid``, each the
    load enable of one group's lanes of the row's copy (driven from flip-flops kept apart, each beside
    its group, rather than one enable for the whole copy); they must equal ``valid``.
    """

    def __init__(self, lanes, group=None, digit_bits=None, product_latency=1, load_copies=False):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive int, not {lanes!r}")
        group = lanes if group is None else group
        if not isinstance(group, int) or group < 1 or lanes % group:
            raise ValueError(f"group must be a positive divisor of lanes ({lanes}), not {group!r}")
        if digit_bits not in (None, 4, 8, 16):
            raise ValueError(f"digit_bits must be 4, 8, 16 or None, not {digit_bits!r}")
        if product_latency not in (1, 2):
            raise ValueError(f"product_latency must be 1 or 2, not {product_latency!r}")
        self.lanes, self.group, self.digit_bits = lanes, group, digit_bits
        self.digits = 1 if digit_bits is None else -(-31 // digit_bits)
        self.steps = lanes // group * self.digits
        self.product_latency = product_latency if digit_bits is None else 1
        # (a row that takes several steps is copied first: a cycle more; a full-width product takes two,
        # or three)
        # (and a product in two cycles a shift in two too)
        self.split_shift = self.product_latency == 2
        self.latency = (4 + self.steps + (self.steps > 1) + (digit_bits is None) * self.product_latency
                        + self.split_shift)
        if load_copies and self.steps == 1:
            raise ValueError("load_copies needs a row copied first: several steps a row (group < lanes or "
                             "digit_bits)")
        self.load_copies = load_copies
        members = {"load": In(lanes // group)} if load_copies else {}
        super().__init__({**members,
            "acc": In(data.ArrayLayout(signed(32), lanes)),
            "bias": In(data.ArrayLayout(signed(32), lanes)),
            "m0": In(data.ArrayLayout(unsigned(31), lanes)),
            "shift": In(data.ArrayLayout(unsigned(6), lanes)),
            "mode": In(2),
            "valid": In(1),
            "out": Out(data.ArrayLayout(signed(32), lanes)),
            "out_valid": Out(1),
        })

    def elaborate(self, platform):
        """The row's copy (when a row takes several steps), the valid/mode/group flags that travel down
        the stages, and ``group`` lanes of the datapath, each ending in its slot of the output row."""
        m = Module()
        v0, mode0, group0, digit0, feed = self._row_copy(m)
        flags = self._stage_flags(m, v0, mode0, group0, digit0)
        # the output row as one register a lane (a row-wide register is copied whole every cycle in
        # simulation)
        out = [Signal(signed(32), name=f"out{k}", reset_less=True) for k in range(self.lanes)]
        for j in range(self.group):
            self._lane(m, platform, j, feed, flags, out)
        m.d.comb += [self.out[k].eq(out[k]) for k in range(self.lanes)]
        return m

    def _row_copy(self, m):
        """What stage 1 takes: the ports themselves when a row takes one step; otherwise a copy of the row
        made in its valid cycle, which goes through a step a cycle from the next (step s is group
        ``s // digits``, digit ``s % digits``). Returns the first stage's valid, mode, group and digit,
        and its four inputs (``group`` lanes each)."""
        G, R, D, T = self.group, self.lanes // self.group, self.digits, self.steps
        digit_shift = (D - 1).bit_length()          # step = group * D + digit (D is a power of two)
        ports = (self.acc, self.bias, self.m0, self.shift)
        if T == 1:
            return self.valid, self.mode, Const(0, 1), Const(0, 1), ports
        # fed from flip-flops only, the first stage needs no enable, so ``valid`` fans out to the copy's
        # enables alone
        held = [Signal.like(port, name=f"held_{name}", reset_less=True)
                for port, name in zip(ports, ("acc", "bias", "m0", "shift"))]
        held_mode = Signal(2)
        first, step = Signal(), Signal(range(T))
        m.d.sync += first.eq(self.valid)
        v0, mode0 = first | (step != 0), held_mode
        group0 = step[digit_shift:] if R > 1 else Const(0, 1)
        digit0 = step[:digit_shift] if D > 1 else Const(0, 1)
        # a group's lanes (in bits) of each port
        width = [len(port.as_value()) // R for port in ports]
        with m.If(v0):
            m.d.sync += step.eq(Mux(step == T - 1, 0, step + 1))
        with m.If(self.valid):
            m.d.sync += held_mode.eq(self.mode)
        # the held row shifts down a group as each group is done, so the group in work is always the
        # lowest: each lane's register takes the one a group above it, not one of R through a
        # multiplexer. The top group keeps its lanes as the others shift (nothing reads them before the
        # next row is loaded), so its flip-flops need no reset of their own.
        shifting = v0 & (digit0 == D - 1) if R > 1 else Const(0, 1)
        if self.load_copies:
            for g in range(R):
                with m.If(self.load[g]):
                    m.d.sync += [h.as_value()[g * w:(g + 1) * w].eq(port.as_value()[g * w:(g + 1) * w])
                                 for h, port, w in zip(held, ports, width)]
                if g < R - 1:
                    with m.Elif(shifting):
                        m.d.sync += [h.as_value()[g * w:(g + 1) * w].eq(h.as_value()[(g + 1) * w:(g + 2) * w])
                                     for h, w in zip(held, width)]
        else:
            with m.If(self.valid):
                m.d.sync += [h.eq(port) for h, port in zip(held, ports)]
            if R > 1:
                with m.Elif(shifting):
                    m.d.sync += [h.as_value()[:-w].eq(h.as_value()[w:]) for h, w in zip(held, width)]
        feed = [data.View(data.ArrayLayout(port.shape().elem_shape, G), h.as_value()[:w])
                for port, h, w in zip(ports, held, width)]
        return v0, mode0, group0, digit0, feed

    def _stage_flags(self, m, v0, mode0, group0, digit0):
        """Each stage's valid, mode and group (and the digit in stage 1), a cycle apart: stage 1 the bias
        sum, 2 the product (2a, 2a' and 2b for a full-width one; one digit a cycle for a digit-serial one,
        valid in stage 2 after the last), 3 the rounding sum, 4 the shift (4a and 4b when split), 5 the
        saturation; ``out_valid`` once the row's last group is saturated."""
        R, D = self.lanes // self.group, self.digits
        f = SimpleNamespace()
        v1, v2, v3, v4 = Signal(), Signal(), Signal(), Signal()
        mode1, mode2, mode3, mode4 = Signal(2), Signal(2), Signal(2), Signal(2)
        group1, group2, group3, group4 = (Signal.like(group0, name=f"group{k}") for k in (1, 2, 3, 4))
        digit1 = Signal.like(digit0, name="digit1")
        # with the shift in two cycles, stage 4b's between 4a and 5
        v3b, mode3b, group3b = v3, mode3, group3
        if self.split_shift:
            v3b, mode3b, group3b = Signal(), Signal(2), Signal.like(group0, name="group3b")
            m.d.sync += [v3b.eq(v3), mode3b.eq(mode3), group3b.eq(group3)]
        m.d.sync += [v1.eq(v0), v3.eq(v2), v4.eq(v3b),
                     mode1.eq(mode0), mode3.eq(mode2), mode4.eq(mode3b), digit1.eq(digit0),
                     group1.eq(group0), group3.eq(group2), group4.eq(group3b)]
        if D == 1:
            # the full-width product takes two cycles or three (its partial products, then their sums):
            # stages 2a (and 2a'), 2b
            v1b, mode1b, group1b = Signal(), Signal(2), Signal.like(group0, name="group1b")
            if self.product_latency == 2:
                v1a, mode1a, group1a = Signal(), Signal(2), Signal.like(group0, name="group1a")
                m.d.sync += [v1a.eq(v1), mode1a.eq(mode1), group1a.eq(group1),
                             v1b.eq(v1a), mode1b.eq(mode1a), group1b.eq(group1a)]
                f.v1a = v1a
            else:
                m.d.sync += [v1b.eq(v1), mode1b.eq(mode1), group1b.eq(group1)]
            m.d.sync += [v2.eq(v1b), mode2.eq(mode1b), group2.eq(group1b)]
            f.v1b = v1b
        else:
            m.d.sync += [v2.eq(v1 & (digit1 == D - 1)), mode2.eq(mode1), group2.eq(group1)]
        m.d.sync += self.out_valid.eq(v4 & (group4 == R - 1))
        f.v0, f.v1, f.v2, f.v3, f.v3b, f.v4, f.mode4, f.digit1 = v0, v1, v2, v3, v3b, v4, mode4, digit1
        return f

    def _lane(self, m, platform, j, feed, f, out):
        """Lane ``j`` of the datapath: stage 1 adds the bias (the sum fits int32 by contract), stages 2-4
        multiply, round and shift (:meth:`_full_width` or :meth:`_digit_serial`), stage 5 saturates per
        mode into the output row, which shifts down a group as each lands in the top group, so group g
        ends in its slot after the last (each lane's register takes one neighbour, not a result
        broadcast to every group). Data registers carry no reset (only the valid flags do), and each
        stage's registers load only with a row in it, but stage 1 of a row held in flip-flops, which
        loads every cycle."""
        G, T = self.group, self.steps
        acc, bias, m0, shift = feed
        reg = partial(_lane_register, j)
        s1, m0_1, sh1 = reg(signed(32), "sum"), reg(unsigned(31), "m0_1_"), reg(unsigned(6), "sh1_")
        stage1 = [s1.eq(acc[j] + bias[j]), m0_1.eq(m0[j]), sh1.eq(shift[j])]
        if T == 1:
            with m.If(f.v0):
                m.d.sync += stage1
        else:
            m.d.sync += stage1
        s2, sh2 = reg(signed(32), "sum2_"), reg(unsigned(6), "sh2_")
        rounded3, s3 = reg(signed(64), "rounded"), reg(signed(32), "sum3_")
        r, s4 = reg(signed(64), "shifted"), reg(signed(32), "sum4_")
        stages = (s1, m0_1, sh1, s2, sh2, rounded3, s3, r, s4)
        if self.digits == 1:
            self._full_width(m, platform, j, f, *stages)
        else:
            self._digit_serial(m, reg, f, *stages)
        res = Signal(signed(32), name=f"res{j}")
        _saturate(m, res, r, s4, f.mode4, by_bits=True)
        with m.If(f.v4):
            m.d.sync += [out[k].eq(out[k + G]) for k in range(j, self.lanes - G, G)]
            m.d.sync += out[self.lanes - G + j].eq(res)

    def _full_width(self, m, platform, j, f, s1, m0_1, sh1, s2, sh2, rounded3, s3, r, s4):
        """Stages 2-4 with the 32 x 31 product in one step: four 16 x 16 partial products (2a; with
        ``product_latency=2`` each inside a DSP block's input and output registers, 2a'), summed into two
        halves with the rounding constant beside them (2b), the rounding sum (3) and the arithmetic shift
        (4, or 4a and 4b by a multiple of 8 and then the rest)."""
        reg = partial(_lane_register, j)
        s_lo, s_hi = s1[:16], s1[16:].as_signed()
        m_lo, m_hi = m0_1[:16], m0_1[16:]
        operands = [(s_lo, m_lo, "pp_ll"), (s_lo, m_hi, "pp_lh"), (s_hi, m_lo, "pp_hl"), (s_hi, m_hi, "pp_hh")]
        s1b, sh1b = reg(signed(32), "sum1b_"), reg(unsigned(6), "sh1b_")
        if self.product_latency == 2:
            # every cycle, with the sum and shift beside them two registers deep
            pp = [registered_product(m, platform, x, y, f"{name}{j}") for x, y, name in operands]
            s1a, sh1a = reg(signed(32), "sum1a_"), reg(unsigned(6), "sh1a_")
            with m.If(f.v1):
                m.d.sync += [s1a.eq(s1), sh1a.eq(sh1)]
            with m.If(f.v1a):
                m.d.sync += [s1b.eq(s1a), sh1b.eq(sh1a)]
        else:
            pp = [reg((x * y).shape(), name) for x, y, name in operands]
            with m.If(f.v1):
                m.d.sync += [p.eq(x * y) for p, (x, y, _) in zip(pp, operands)]
                m.d.sync += [s1b.eq(s1), sh1b.eq(sh1)]
        # stage 2b: the product as two registered halves, s1 * m0[:16] and s1 * m0[16:], and the rounding
        # constant 2**(shift-1) (0 for shift 0), as a right shift of a constant: a variable left shift
        # would widen to 127 bits
        lo2, hi2 = reg(signed(48), "prod_lo"), reg(signed(47), "prod_hi")
        half2, sh3 = reg(unsigned(REQUANT_SHIFT_MAX), "half"), reg(unsigned(6), "sh3_")
        with m.If(f.v1b):
            m.d.sync += [lo2.eq(pp[0] + (pp[2] << 16)), hi2.eq(pp[1] + (pp[3] << 16)), s2.eq(s1b),
                         sh2.eq(sh1b),
                         half2.eq(Const(1 << (REQUANT_SHIFT_MAX - 1), unsigned(REQUANT_SHIFT_MAX))
                                  >> (REQUANT_SHIFT_MAX - sh1b).as_unsigned())]
        # stage 3: product + half; |product| < 2**62, so the sum fits 64 bits. Added as a low 16 bits and
        # a carried high part: a three-term sum of 64-bit operands is 65 bits wide in Verilog, which
        # Verilator computes as arrays of words every cycle. The low sum is written out twice, not
        # shared, so single-use terms stay inside the enable.
        high = lo2[16:].as_signed() + hi2 + half2[16:] + (lo2[:16] + half2[:16])[16]
        with m.If(f.v2):
            m.d.sync += [rounded3.eq(Cat((lo2[:16] + half2[:16])[:16], high[:48])), s3.eq(s2),
                         sh3.eq(sh2)]
        # stage 4: the arithmetic shift, a 64-bit barrel shifter with a cycle to itself
        if self.split_shift:
            # in two: by the multiple of 8, then by the rest, x >> 8a >> b being x >> (8a + b)
            ra, sha, s3b = reg(signed(64), "shifted_a"), reg(unsigned(3), "sh4a_"), reg(signed(32), "sum3b_")
            with m.If(f.v3):
                m.d.sync += [ra.eq(rounded3 >> Cat(Const(0, 3), sh3[3:])), sha.eq(sh3[:3]), s3b.eq(s3)]
            with m.If(f.v3b):
                m.d.sync += [r.eq(ra >> sha), s4.eq(s3b)]
        else:
            with m.If(f.v3):
                m.d.sync += [r.eq(rounded3 >> sh3), s4.eq(s3)]

    def _digit_serial(self, m, reg, f, s1, m0_1, sh1, s2, sh2, rounded3, s3, r, s4):
        """Stages 2-4 with a digit-serial product, least significant digit first: ``carry = (carry >> d)
        + s1 * digit``, the low d bits of each shifted into ``low``; after the last digit the product is
        ``(low, carry >> d)``. Then ``(p + 2**(shift-1)) >> shift`` as ``((2p >> shift) + 1) >> 1`` — the
        same floor for every shift, 0 included — so no rounding constant and no 64-bit three-term sum
        (|p| < 2**62: 2p fits 64 bits)."""
        d, D = self.digit_bits, self.digits
        digit = Cat(m0_1, Const(0, D * d - 31)).word_select(f.digit1, d)
        carry, low = reg(signed(33 + d), "carry"), reg(unsigned(D * d), "low")
        partial_sum = Mux(f.digit1 == 0, 0, carry >> d) + s1 * digit
        with m.If(f.v1):
            m.d.sync += [carry.eq(partial_sum), low.eq(Cat(low[d:], partial_sum[:d])), s2.eq(s1), sh2.eq(sh1)]
        with m.If(f.v2):
            m.d.sync += [rounded3.eq(Cat(Const(0, 1), low, carry[d:]).as_signed()[:64].as_signed() >> sh2),
                         s3.eq(s2)]
        with m.If(f.v3):
            m.d.sync += [r.eq((rounded3 + 1) >> 1), s4.eq(s3)]


class BitSerialRequantizer(wiring.Component):
    """The requantization of :class:`Requantizer`, one lane at a time and one product bit a cycle, with
    the parameters read from the engine's parameter memory: the smallest epilogue, for an FPGA whose
    logic, not its speed, is the limit (an iCE40 UP5K behind a UART).

    ``valid`` takes a row: ``mode`` and a ``tag`` (``tag_bits``: the engine's output address and
    parameter buffer) that comes back with the row on ``out_tag``, and the ``lanes`` accumulators, which
    are not copied but read lane by lane, lane k ``2 + 68 * k`` cycles after ``valid``: ``acc`` must
    hold the row until then. The lanes'
    parameters are then read in the pool's parameter layout (``proto.isa``; ``word_bits = 8 * lanes``):
    ``p_en`` with ``p_addr`` (0-3 bias, 4-7 m0, 8 shifts), the word on ``p_data`` the cycle after; the
    row's tag is on ``tag_held`` meanwhile. Lane by lane: ``x = acc + bias`` (int32, the contract), then
    ``2p = x * (2 * m0)`` is formed LSB-first, one multiplier bit a cycle, and each product bit as it
    appears is kept when it falls into ``2p >> shift``'s low 17 bits or folded into "some higher bit
    differs from the sign"; the result is ``((2p >> shift) + 1) >> 1`` — the contract's one rounding,
    half toward +inf — saturated per mode (int8, int16; int32 is ``x``, unrounded).

    The results come out a lane at a time, in order: ``out`` (int32) with ``out_lane`` for one cycle of
    ``out_valid``, the first 70 cycles after ``valid``, then one every 68 cycles; the last, lane
    ``lanes - 1``, ``latency = steps = 68 * lanes + 2`` cycles after ``valid``. ``out_tag`` holds the
    row's tag until the next ``valid``, which is taken when ``ready`` (every ``steps`` cycles at most).
    """

    # bits of r = 2p >> shift kept: every unsaturated int16 result comes from an r in [-2**16, 2**16), and
    # an r outside saturates (r = -2**16 - 1 rounds to -2**15, the saturated value too)
    WINDOW = 17

    def __init__(self, lanes, tag_bits=1):
        if not isinstance(lanes, int) or lanes < 4 or lanes % 4:
            raise ValueError(f"lanes must be a positive multiple of 4, not {lanes!r}")
        self.lanes, self.tag_bits = lanes, tag_bits
        self.group, self.digits = 1, 32
        self.steps = self.latency = 68 * lanes + 2
        super().__init__({
            "acc": In(data.ArrayLayout(signed(32), lanes)),
            "mode": In(2),
            "tag": In(tag_bits),
            "valid": In(1),
            "ready": Out(1),
            "p_addr": Out(range(9)),
            "p_en": Out(1),
            "p_data": In(8 * lanes),
            "tag_held": Out(tag_bits),
            "out": Out(signed(32)),
            "out_lane": Out(range(lanes)),
            "out_tag": Out(tag_bits),
            "out_valid": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        L, W = self.lanes, self.WINDOW
        per_word = L // 4                       # lanes of bias (m0) per parameter word
        mode, lane = Signal(2), Signal(range(L))
        m.d.comb += self.tag_held.eq(self.out_tag)

        def lane_slice(word, j):
            # lane j's 32 bits of a bias or m0 word
            return word.word_select(j % per_word, 32) if per_word > 1 else word
        x = Signal(signed(32), reset_less=True)         # acc + bias
        mul = Signal(32, reset_less=True)               # 2 * m0, shifted right a bit a cycle
        sh = Signal(6, reset_less=True)
        prod = Signal(signed(33), reset_less=True)      # the product's bits not yet out, as a sum
        bit = Signal(6)                                 # the bit of 2p that comes out this cycle
        got = Signal(range(W + 1))                      # bits of the window filled
        win = Signal(W, reset_less=True)
        seen0, seen1, sign = Signal(), Signal(), Signal()
        m.d.sync += self.out_valid.eq(0)

        # the finished lane: 2p >> shift is (win, then sign bits) unless a bit above the window differs
        r = win.as_signed()
        overflow = (win[W - 1] != sign) | Mux(sign, seen0, seen1)
        q = Signal(signed(W + 1))
        m.d.comb += q.eq((r + 1) >> 1)
        res = Signal(signed(32))
        # (an overflow saturates by its sign: any value beyond int16 does)
        _saturate(m, res, Mux(overflow, Mux(sign, -(1 << W), 1 << W), q), x, mode)

        def fetch(word):
            m.d.comb += [self.p_en.eq(1), self.p_addr.eq(word)]

        def word_of(j):
            return j if per_word == 1 else j // per_word

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.ready.eq(1)
                with m.If(self.valid):
                    m.d.sync += [mode.eq(self.mode), self.out_tag.eq(self.tag), lane.eq(0)]
                    m.next = "BIAS"
            with m.State("BIAS"):
                fetch(word_of(lane))
                m.next = "M0"
            with m.State("M0"):
                fetch(4 + word_of(lane))
                m.d.sync += x.eq(self.acc[lane] + lane_slice(self.p_data, lane).as_signed())
                m.next = "SHIFT"
            with m.State("SHIFT"):
                fetch(8)
                m.d.sync += mul.eq(Cat(Const(0, 1), lane_slice(self.p_data, lane)[:31]))
                m.next = "LOAD"
            with m.State("LOAD"):
                m.d.sync += [sh.eq(self.p_data.word_select(lane, 8)[:6]), prod.eq(0), bit.eq(0), got.eq(0),
                             seen0.eq(0), seen1.eq(0)]
                m.next = "STREAM"
            with m.State("STREAM"):
                # shift-and-add, LSB first: the sum's low bit is the next bit of 2p (after mul's 32 bits,
                # the sum only shifts: the product's high bits, down to its sign)
                total = Signal(signed(34))
                m.d.comb += total.eq(prod + Mux(mul[0], x, 0))
                b = total[0]
                m.d.sync += [prod.eq(total >> 1), mul.eq(mul >> 1), bit.eq(bit + 1)]
                with m.If(bit >= sh):
                    with m.If(got < W):
                        m.d.sync += got.eq(got + 1)
                        for k in range(W):
                            # the bit lands at its place; the last one (the sign) fills the rest too
                            with m.If((got == k) | ((bit == 63) & (got < k))):
                                m.d.sync += win[k].eq(b)
                    with m.Else():
                        m.d.sync += [seen0.eq(seen0 | ~b), seen1.eq(seen1 | b)]
                with m.If(bit == 63):
                    m.d.sync += sign.eq(b)
                    m.next = "DONE"
            with m.State("DONE"):
                # (one result register, not one a lane: the engine writes each lane's part as it comes)
                m.d.sync += [self.out.eq(res), self.out_lane.eq(lane), self.out_valid.eq(1), lane.eq(lane + 1)]
                with m.If(lane == L - 1):
                    m.next = "IDLE"
                with m.Else():
                    fetch(word_of(lane + 1))        # the next lane's bias
                    m.next = "M0"
        return m
