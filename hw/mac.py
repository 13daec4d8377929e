"""The FPGAs' multiplier blocks, where Yosys would not use them as they can be: two PEs' products in one
iCE40 SB_MAC16 (its dual 8x8 mode); a multiply with its operands and product registered inside an ECP5
MULT18X18D."""

from amaranth import Cat, ClockSignal, Const, Instance, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ProductPair", "is_ecp5", "is_ice40", "registered_product"]


def is_ice40(platform):
    """Whether ``platform`` builds for an iCE40 (Amaranth's SiliconBlue platforms say so in ``family``)."""
    return getattr(platform, "family", None) == "iCE40"


def is_ecp5(platform):
    """Whether ``platform`` builds for an ECP5 (Amaranth's Lattice platforms say so in ``family``)."""
    return getattr(platform, "family", None) == "ecp5"


def registered_product(m, platform, a, b, name):
    """``a * b`` two cycles later: the operands registered, then their product (every cycle, no enable,
    no reset). Operands of up to 18 bits as signed, 17 as unsigned; the product is as wide as both.

    On an ECP5 that is one MULT18X18D with its input and output registers: Yosys maps a multiply to one
    without them (it has only black boxes), so a multiply between fabric registers has the routing into
    the block and out of it in one cycle, across the die where the block is far from its logic.
    Elsewhere, and in simulation, two flip-flop stages.
    """
    shape = (a * b).shape()
    if any(len(x) + (not x.shape().signed) > 18 for x in (a, b)):
        raise ValueError(f"{name}: a MULT18X18D takes 18-bit signed operands, not {a.shape()} x {b.shape()}")
    p = Signal(shape, name=f"{name}_p")
    if not is_ecp5(platform):
        a_reg = Signal(a.shape(), name=f"{name}_a", reset_less=True)
        b_reg = Signal(b.shape(), name=f"{name}_b", reset_less=True)
        m.d.sync += [a_reg.eq(a), b_reg.eq(b), p.eq(a_reg * b_reg)]
        return p
    a18, b18, p36 = Signal(signed(18), name=f"{name}_a18"), Signal(signed(18), name=f"{name}_b18"), Signal(36)
    m.d.comb += [a18.eq(a), b18.eq(b), p.eq(p36[:len(p)])]
    # A and B registered on CLK0 (always enabled, never reset), then P; the ports are single bits
    bits = {f"i_A{k}": a18[k] for k in range(18)}
    bits.update({f"i_B{k}": b18[k] for k in range(18)})
    bits.update({f"i_C{k}": 0 for k in range(18)})
    bits.update({f"o_P{k}": p36[k] for k in range(36)})
    m.submodules[name] = Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK="CLK0", p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
        p_REG_INPUTB_CLK="CLK0", p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
        p_REG_OUTPUT_CLK="CLK0", p_REG_OUTPUT_CE="CE0", p_REG_OUTPUT_RST="RST0",
        p_REG_INPUTC_CLK="NONE", p_REG_PIPELINE_CLK="NONE",
        p_CLK0_DIV="ENABLED", p_GSR="DISABLED", p_RESETMODE="SYNC",
        p_SOURCEB_MODE="B_SHIFT", p_MULT_BYPASS="DISABLED",
        i_SIGNEDA=1, i_SIGNEDB=1, i_SOURCEA=0, i_SOURCEB=0,
        i_CLK0=ClockSignal(), i_CE0=1, i_RST0=0,
        **bits,
    )
    return p


class ProductPair(wiring.Component):
    """Two signed 8 x 8 products a cycle, each registered: ``p0 <= a0 * b0``, ``p1 <= a1 * b1`` (latency 1,
    every cycle, no enable, no reset).

    On an iCE40 this is one SB_MAC16 in its 8 x 8 mode — the top multiplier takes ``a1 * b1``, the bottom
    one ``a0 * b0``, each into its own output register — so the UP5K's 8 DSP blocks make the 16 products
    of a 4 x 4 array. (Yosys, left to itself, maps one 8 x 8 multiply to a whole SB_MAC16, and with
    ``-dsp`` packed a PE's multiply and add into one with a wrong sign extension: Yosys 0.70 zero-extended
    a 17-bit signed sum; see the README.) Elsewhere, and in simulation, the same as two multiplies.
    That the bottom multiplier is signed in 8 x 8 mode is what Yosys' SB_MAC16 model says (its
    ``cells_sim.v`` sign-extends A[7:0] and B[7:0] when MODE_8x8 and A_SIGNED/B_SIGNED) and what the
    post-synthesis test relies on; no iCEBreaker has run this yet.
    """

    a0: In(signed(8))
    b0: In(signed(8))
    a1: In(signed(8))
    b1: In(signed(8))
    p0: Out(signed(16))
    p1: Out(signed(16))

    def elaborate(self, platform):
        m = Module()
        if not is_ice40(platform):
            p0, p1 = Signal(signed(16), reset_less=True), Signal(signed(16), reset_less=True)
            m.d.sync += [p0.eq(self.a0 * self.b0), p1.eq(self.a1 * self.b1)]
            m.d.comb += [self.p0.eq(p0), self.p1.eq(p1)]
            return m
        out = Signal(32)
        zero16 = Const(0, 16)
        m.submodules.mac = Instance(
            "SB_MAC16",
            # 8 x 8 mode, signed: A[15:8] * B[15:8] is the top product, A[7:0] * B[7:0] the bottom one,
            # each through its 8 x 8 output register (F, G) straight to O[31:16] / O[15:0]
            p_MODE_8x8=1, p_A_SIGNED=1, p_B_SIGNED=1,
            p_TOP_8x8_MULT_REG=1, p_BOT_8x8_MULT_REG=1,
            p_TOPOUTPUT_SELECT=2, p_BOTOUTPUT_SELECT=2,
            p_A_REG=0, p_B_REG=0, p_C_REG=0, p_D_REG=0,
            p_PIPELINE_16x16_MULT_REG1=0, p_PIPELINE_16x16_MULT_REG2=0, p_NEG_TRIGGER=0,
            p_TOPADDSUB_LOWERINPUT=0, p_TOPADDSUB_UPPERINPUT=0, p_TOPADDSUB_CARRYSELECT=0,
            p_BOTADDSUB_LOWERINPUT=0, p_BOTADDSUB_UPPERINPUT=0, p_BOTADDSUB_CARRYSELECT=0,
            i_CLK=ClockSignal(), i_CE=1,
            i_A=Cat(self.a0, self.a1),
            i_B=Cat(self.b0, self.b1),
            i_C=zero16, i_D=zero16,
            i_AHOLD=0, i_BHOLD=0, i_CHOLD=0, i_DHOLD=0, i_IRSTTOP=0, i_IRSTBOT=0, i_ORSTTOP=0, i_ORSTBOT=0,
            i_OLOADTOP=0, i_OLOADBOT=0, i_ADDSUBTOP=0, i_ADDSUBBOT=0, i_OHOLDTOP=0, i_OHOLDBOT=0,
            i_CI=0, i_ACCUMCI=0, i_SIGNEXTIN=0,
            o_O=out,
        )
        m.d.comb += [self.p0.eq(out[:16]), self.p1.eq(out[16:])]
        return m
