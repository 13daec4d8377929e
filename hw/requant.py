"""The requantization epilogue on each output column."""

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .isa import Mode

__all__ = ["Requantizer"]


class Requantizer(wiring.Component):
    """``lanes`` columns of ``out = sat((acc + bias) * m0 + 2**(shift-1)) >> shift)``, as the contract's
    ``ref_gemm(..., bias)`` followed by ``ref_requant`` (one rounding, half toward +inf).

    ``mode`` (see :class:`hw.isa.Mode`) picks int8 or int16 saturation, or the int32 bypass that returns
    ``acc + bias`` unrounded. Everything presented with ``valid`` (the accumulator, the per-lane ``bias``,
    ``m0`` in [0, 2**31) and ``shift`` in [0, 62], the mode) travels down the pipeline together, so the
    parameters may change every cycle. Latency: 3 cycles; throughput: one row per cycle; no stall.
    ``acc + bias`` must fit int32 (the contract guarantees it).
    """

    LATENCY = 3

    def __init__(self, lanes):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive int, not {lanes!r}")
        self.lanes = lanes
        super().__init__({
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
        m = Module()
        v1, v2 = Signal(), Signal()
        mode1, mode2 = Signal(2), Signal(2)
        m.d.sync += [v1.eq(self.valid), v2.eq(v1), self.out_valid.eq(v2),
                     mode1.eq(self.mode), mode2.eq(mode1)]
        for j in range(self.lanes):
            # stage 1: add the bias (the sum fits int32 by contract; keep 32 bits)
            # data registers carry no reset (only the valid flags do): fewer LUTs, faster simulation
            s1 = Signal(signed(32), name=f"sum{j}", reset_less=True)
            m0_1 = Signal(unsigned(31), name=f"m0_{j}_1", reset_less=True)
            sh1 = Signal(unsigned(6), name=f"sh{j}_1", reset_less=True)
            m.d.sync += [s1.eq(self.acc[j] + self.bias[j]), m0_1.eq(self.m0[j]), sh1.eq(self.shift[j])]
            # stage 2: the 32 x 31-bit product; |product| < 2**62, so 63 bits hold it
            p2 = Signal(signed(63), name=f"prod{j}", reset_less=True)
            s2 = Signal(signed(32), name=f"sum{j}_2", reset_less=True)
            sh2 = Signal(unsigned(6), name=f"sh{j}_2", reset_less=True)
            m.d.sync += [p2.eq(s1 * m0_1), s2.eq(s1), sh2.eq(sh1)]
            # stage 3: round half up, arithmetic shift, saturate per mode
            # 2**(shift-1) (0 for shift 0) as a right shift of a constant: a variable left shift would widen
            # to 127 bits, and every intermediate here stays within 64 (wide values simulate ~10x slower)
            half = Signal(unsigned(62), name=f"half{j}")
            m.d.comb += half.eq(Const(1 << 61, unsigned(62)) >> (62 - sh2).as_unsigned())
            rounded = Signal(signed(64), name=f"sum{j}_r")
            m.d.comb += rounded.eq(p2 + half)
            r = Signal(signed(64), name=f"round{j}")
            m.d.comb += r.eq(rounded >> sh2)
            lo = Mux(mode2 == Mode.INT8, -128, -32768)
            hi = Mux(mode2 == Mode.INT8, 127, 32767)
            with m.If(mode2 == Mode.INT32):
                m.d.sync += self.out[j].eq(s2)
            with m.Elif(r < lo):
                m.d.sync += self.out[j].eq(lo)
            with m.Elif(r > hi):
                m.d.sync += self.out[j].eq(hi)
            with m.Else():
                m.d.sync += self.out[j].eq(r)
        return m
