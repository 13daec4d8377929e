"""One processing element of the weight-stationary systolic array."""

from amaranth import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ProcessingElement"]


class ProcessingElement(wiring.Component):
    """A weight-stationary int8 MAC with two weight registers and a registered product.

    Every cycle: ``prod <= a_in * w[sel_in]``, ``psum_out <= psum_in + prod`` and ``a_out, sel_out <=
    a_in, sel_in``. So ``a_out``/``sel_out`` follow ``a_in``/``sel_in`` by one cycle, and the product of
    the activation presented in cycle t is added to the ``psum_in`` presented in cycle t + 1 and leaves
    on ``psum_out`` in cycle t + 2. (The product register is what lets the multiplier and the adder each
    have a cycle: 50 -> 96 MHz on an ECP5 at 8x8, ~25 -> 32 MHz on an iCE40.) ``w[w_bank] <= w_data``
    when ``w_we``; the weight is read in the cycle its activation arrives. The weight not selected by the
    data in flight can be rewritten while the other computes: that is what lets tiles follow each other
    without a bubble. The 32-bit accumulation wraps; callers keep sums inside int32.

    Members: ``a_in``/``a_out`` (int8), ``sel_in``/``sel_out``, ``psum_in``/``psum_out`` (int32),
    ``w_data`` (int8), ``w_we``, ``w_bank``.
    """

    a_in: In(signed(8))
    sel_in: In(1)
    psum_in: In(signed(32))
    a_out: Out(signed(8))
    sel_out: Out(1)
    psum_out: Out(signed(32))
    w_data: In(signed(8))
    w_we: In(1)
    w_bank: In(1)

    def elaborate(self, platform):
        m = Module()
        # datapath registers carry no reset: what they hold before the first valid row is never used, and
        # without reset logic they cost fewer LUTs and simulate faster
        w = [Signal(signed(8), name=f"w{b}", reset_less=True) for b in range(2)]
        with m.If(self.w_we):
            with m.If(self.w_bank):
                m.d.sync += w[1].eq(self.w_data)
            with m.Else():
                m.d.sync += w[0].eq(self.w_data)
        weight = Signal(signed(8))
        with m.If(self.sel_in):
            m.d.comb += weight.eq(w[1])
        with m.Else():
            m.d.comb += weight.eq(w[0])
        prod = Signal(signed(16), name="prod", reset_less=True)
        a, sel, psum = (Signal.like(port, reset_less=True) for port in (self.a_out, self.sel_out, self.psum_out))
        m.d.sync += [a.eq(self.a_in), sel.eq(self.sel_in), prod.eq(self.a_in * weight), psum.eq(self.psum_in + prod)]
        m.d.comb += [self.a_out.eq(a), self.sel_out.eq(sel), self.psum_out.eq(psum)]
        return m
