"""One processing element of the weight-stationary systolic array."""

from amaranth import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .mac import registered_product

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

    With ``external_product`` the multiplier is outside: the PE presents its operands on ``mul_a`` and
    ``mul_w`` and takes their product, registered, on ``mul_p`` one cycle later (an iCE40 DSP block then
    computes the products of two PEs; see :class:`ambert.hw.mac.ProductPair`). Same timing, same results.
    ``psum_bits`` (default 32) narrows the partial sums, for an array that knows its sums fit. With
    ``external_weight`` the array keeps the weights (in a block RAM a row) and presents the selected one
    on ``weight`` with ``a_in``: no weight registers, no ``w_*`` members.

    ``product_latency`` 2 (default 1) registers the operands as well: ``a_in`` and the selected weight,
    then their product, so a product is added a cycle later (``psum_out`` in cycle t + 3), nothing else.
    On an ECP5 that is one MULT18X18D with its input and output registers, the multiply wholly inside the
    DSP block: what reaches it from the fabric (the activation from the neighbouring column, the weight)
    only has to arrive, and what leaves it starts from a register.

    Members: ``a_in``/``a_out`` (int8), ``sel_in``/``sel_out``, ``psum_in``/``psum_out`` (int32),
    ``w_data`` (int8), ``w_we``, ``w_bank``; with ``external_product``, ``mul_a``, ``mul_w`` (int8) and
    ``mul_p`` (int16).
    """

    def __init__(self, external_product=False, psum_bits=32, external_weight=False, product_latency=1):
        if product_latency not in (1, 2):
            raise ValueError(f"product_latency must be 1 or 2, not {product_latency!r}")
        if external_product and product_latency != 1:
            raise ValueError("an external product is registered once: product_latency must be 1")
        self.external_product = bool(external_product)
        self.external_weight = bool(external_weight)
        self.product_latency = product_latency
        ports = {
            "a_in": In(signed(8)), "sel_in": In(1), "psum_in": In(signed(psum_bits)),
            "a_out": Out(signed(8)), "sel_out": Out(1), "psum_out": Out(signed(psum_bits)),
        }
        if self.external_weight:
            ports["weight"] = In(signed(8))
        else:
            ports.update({"w_data": In(signed(8)), "w_we": In(1), "w_bank": In(1)})
        if self.external_product:
            ports.update({"mul_a": Out(signed(8)), "mul_w": Out(signed(8)), "mul_p": In(signed(16))})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        # datapath registers carry no reset: what they hold before the first valid row is never used, and
        # without reset logic they cost fewer LUTs and simulate faster
        if self.external_weight:
            weight = self.weight
        else:
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
        a, psum = (Signal.like(port, reset_less=True) for port in (self.a_out, self.psum_out))
        # (the bank select is the same bit in every PE a given number of cycles after the array's input:
        # kept apart, ``ambert_replica``, as Yosys would merge them and give one PE's to another across the die)
        sel = Signal.like(self.sel_out, reset_less=True, attrs={"ambert_replica": 1})
        if self.external_product:
            prod = self.mul_p
            m.d.comb += [self.mul_a.eq(self.a_in), self.mul_w.eq(weight)]
        elif self.product_latency == 1:
            prod = Signal(signed(16), name="prod", reset_less=True)
            m.d.sync += prod.eq(self.a_in * weight)
        else:
            # on an ECP5 one MULT18X18D with its own registers
            prod = registered_product(m, platform, self.a_in, weight, "mult")
        m.d.sync += [a.eq(self.a_in), sel.eq(self.sel_in), psum.eq(self.psum_in + prod)]
        m.d.comb += [self.a_out.eq(a), self.sel_out.eq(sel), self.psum_out.eq(psum)]
        return m
