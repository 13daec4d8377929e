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
    parameters may change every cycle. Latency: 4 cycles (the product in two registered halves);
    throughput: one row per cycle; no stall.
    ``acc + bias`` must fit int32 (the contract guarantees it).
    """

    LATENCY = 4

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
        v1, v2, v3 = Signal(), Signal(), Signal()
        mode1, mode2, mode3 = Signal(2), Signal(2), Signal(2)
        m.d.sync += [v1.eq(self.valid), v2.eq(v1), v3.eq(v2), self.out_valid.eq(v3),
                     mode1.eq(self.mode), mode2.eq(mode1), mode3.eq(mode2)]
        for j in range(self.lanes):
            # data registers carry no reset (only the valid flags do): fewer LUTs, faster simulation
            def reg(shape, name):
                return Signal(shape, name=f"{name}{j}", reset_less=True)

            # stage 1: add the bias (the sum fits int32 by contract; keep 32 bits)
            s1, m0_1, sh1 = reg(signed(32), "sum"), reg(unsigned(31), "m0_1_"), reg(unsigned(6), "sh1_")
            m.d.sync += [s1.eq(self.acc[j] + self.bias[j]), m0_1.eq(self.m0[j]), sh1.eq(self.shift[j])]
            # stage 2: the 32 x 31-bit product as two registered halves (each a 32 x 16 multiply: two DSP
            # blocks on ECP5, not four chained), and the rounding constant 2**(shift-1) (0 for shift 0),
            # as a right shift of a constant: a variable left shift would widen to 127 bits
            lo2, hi2 = reg(signed(48), "prod_lo"), reg(signed(47), "prod_hi")
            s2, sh2, half2 = reg(signed(32), "sum2_"), reg(unsigned(6), "sh2_"), reg(unsigned(62), "half")
            m.d.sync += [lo2.eq(s1 * m0_1[:16]), hi2.eq(s1 * m0_1[16:]), s2.eq(s1), sh2.eq(sh1),
                         half2.eq(Const(1 << 61, unsigned(62)) >> (62 - sh1).as_unsigned())]
            # stage 3: product + half; |product| < 2**62, so the sum stays within 64 bits (wide values
            # simulate ~10x slower in Verilator)
            rounded3, s3, sh3 = reg(signed(64), "rounded"), reg(signed(32), "sum3_"), reg(unsigned(6), "sh3_")
            m.d.sync += [rounded3.eq(lo2 + (hi2 << 16) + half2), s3.eq(s2), sh3.eq(sh2)]
            # stage 4: arithmetic shift, saturate per mode
            r = Signal(signed(64), name=f"round{j}")
            m.d.comb += r.eq(rounded3 >> sh3)
            lo = Mux(mode3 == Mode.INT8, -128, -32768)
            hi = Mux(mode3 == Mode.INT8, 127, 32767)
            with m.If(mode3 == Mode.INT32):
                m.d.sync += self.out[j].eq(s3)
            with m.Elif(r < lo):
                m.d.sync += self.out[j].eq(lo)
            with m.Elif(r > hi):
                m.d.sync += self.out[j].eq(hi)
            with m.Else():
                m.d.sync += self.out[j].eq(r)
        return m
