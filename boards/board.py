"""What a board file says, and the top that puts :class:`ambert.hw.board.BoardTop` on a board's pins."""

from dataclasses import dataclass
from fractions import Fraction

from amaranth import ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, ResetSignal, Signal
from amaranth.lib import io

from ambert.hw.config import AcceleratorConfig
from ambert.hw.board import BoardTop


__all__ = ["Board", "Size", "PlatformTop", "ecp5_pll_params", "ice40_pll_params"]

RETRY_S = 0.05          # the board's retransmission timeout; the host's USB latency is inside it


@dataclass(frozen=True)
class Size:
    """One configuration a board is built in.

    ``name``: what ``--size`` calls it ("small" is what CI builds, "target" what the board is for);
    ``config``: the :class:`ambert.hw.config.AcceleratorConfig`; ``clock_hz``: its clock, when it is not the
    board's (a larger array that does not reach it); ``seed``: nextpnr's placement seed (a build is
    deterministic for a seed); ``dsp_layout``: its array multipliers placed by :mod:`ambert.boards.layout`
    (an ECP5-85F's), built with nextpnr's static placer and router2.
    """

    name: str
    config: AcceleratorConfig
    clock_hz: float | None = None
    seed: int = 1
    dsp_layout: bool = False

    def __post_init__(self):
        if not isinstance(self.config, AcceleratorConfig):
            raise TypeError(f"size {self.name!r}: config must be an AcceleratorConfig, not {self.config!r}")
        if not isinstance(self.seed, int) or self.seed < 1:
            raise ValueError(f"size {self.name!r}: seed must be a positive integer, not {self.seed!r}")


@dataclass(frozen=True)
class Board:
    """A dev board, as data.

    ``platform``: the amaranth-boards class; ``family``: "ice40" or "ecp5" (which tools and which PLL);
    ``clock_hz``: the clock the design runs at unless a size names its own, the one timing must pass (a
    PLL makes it from the board's oscillator when they differ); ``baud``: the UART's (at least 4 clock
    cycles a bit; where it does not divide a clock, the bits last a cycle more or less, as
    :mod:`ambert.hw.uart` says); ``uart``: the resource number; ``leds``: how many LEDs show the status;
    ``sizes``: the :class:`Size` records it is built in; ``synth_opts``, ``nextpnr_opts``,
    ``script_after_read``: passed to the platform build.
    """

    name: str
    platform: type
    family: str
    clock_hz: float
    baud: int
    sizes: tuple = ()
    uart: int = 0
    leds: int = 4
    synth_opts: str = ""
    nextpnr_opts: str = ""
    script_after_read: str = ""
    programmer: tuple = ()          # the command that programs the bitstream (file name appended)

    def __post_init__(self):
        if self.family not in ("ice40", "ecp5"):
            raise ValueError(f"family must be 'ice40' or 'ecp5', not {self.family!r}")
        names = [size.name for size in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: sizes named twice in {names}")
        for size in self.sizes:
            if not isinstance(size, Size):
                raise TypeError(f"{self.name}: sizes must be Size records, not {size!r}")
        for clock_hz in (self.clock_hz, *(size.clock_hz for size in self.sizes if size.clock_hz is not None)):
            if round(clock_hz) < 4 * self.baud:
                raise ValueError(f"{self.name}: {self.baud} baud is {round(clock_hz) / self.baud:.2f} cycles a bit "
                                 f"of the {clock_hz / 1e6} MHz clock; the UART takes at least 4")
        for size in self.sizes:
            if size.dsp_layout and self.family != "ecp5":
                raise ValueError(f"{self.name}: size {size.name!r} asks for the DSP layout, which is an ECP5's")

    @property
    def size_names(self):
        return [size.name for size in self.sizes]

    @property
    def bitstream_name(self):
        """What the build writes and the programmer takes."""
        return "ambert.bin" if self.family == "ice40" else "ambert.bit"

    def size(self, name):
        """The :class:`Size` called ``name``."""
        for size in self.sizes:
            if size.name == name:
                return size
        raise ValueError(f"{self.name} has sizes {', '.join(self.size_names)}, not {name!r}")

    def config(self, size):
        return self.size(size).config

    def clock(self, size):
        """The clock ``size`` runs at (Hz): the one its build must meet."""
        clock_hz = self.size(size).clock_hz
        return self.clock_hz if clock_hz is None else clock_hz

    def seed(self, size):
        """nextpnr's placement seed for ``size``."""
        return self.size(size).seed

    def divisor(self, size):
        """Clock cycles per UART bit at ``size``'s clock: an integer, or a :class:`~fractions.Fraction`."""
        d = Fraction(round(self.clock(size)), self.baud)
        return int(d) if d.denominator == 1 else d


def ecp5_pll_params(f_in, f_out):
    """EHXPLLL dividers making ``f_out`` from ``f_in`` exactly (VCO 400-800 MHz, phase detector 3.125-400
    MHz): (CLKOP_DIV, CLKI_DIV, CLKFB_DIV), fed back from CLKOP so f_out = f_in / CLKI_DIV * CLKFB_DIV."""
    for op_div in range(1, 129):
        if not 400e6 <= f_out * op_div <= 800e6:
            continue
        for ref in range(1, 129):
            fb = f_out * ref / f_in
            if abs(fb - round(fb)) < 1e-9 and 1 <= round(fb) <= 80 and 3.125e6 <= f_in / ref <= 400e6:
                return op_div, ref, round(fb)
    raise ValueError(f"no ECP5 PLL setting makes {f_out / 1e6} MHz from {f_in / 1e6} MHz")


def ice40_pll_params(f_in, f_out):
    """SB_PLL40 dividers (DIVR, DIVF, DIVQ, FILTER_RANGE) making ``f_out`` from ``f_in`` (PFD 10-133 MHz,
    VCO 533-1066 MHz): f_out = f_in / (DIVR + 1) * (DIVF + 1) / 2**DIVQ, exact to 1 Hz."""
    for divr in range(16):
        pfd = f_in / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            for divq in range(1, 7):
                if 533e6 <= vco <= 1066e6 and abs(vco / 2 ** divq - f_out) < 1:
                    # the loop filter for the phase detector's frequency, numbered from 1 (as icepll)
                    filter_range = next(k for k, lim in enumerate((17e6, 26e6, 44e6, 66e6, 101e6, 1e12), 1)
                                        if pfd < lim)
                    return divr, divf, divq, filter_range
    raise ValueError(f"no iCE40 PLL setting makes {f_out / 1e6} MHz from {f_in / 1e6} MHz")


def _ecp5_pll(m, clk_in, f_in, f_out, domain):
    """An EHXPLLL making ``domain``'s clock; returns the lock signal."""
    op_div, ref, fb = ecp5_pll_params(f_in, f_out)
    locked = Signal()
    m.submodules.pll = Instance(
        "EHXPLLL",
        p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED", p_DPHASE_SOURCE="DISABLED",
        p_OUTDIVIDER_MUXA="DIVA", p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=op_div, p_CLKOP_CPHASE=(op_div - 1) // 2,
        p_CLKOP_FPHASE=0, p_CLKI_DIV=ref, p_CLKFB_DIV=fb, p_FEEDBK_PATH="CLKOP",
        i_CLKI=clk_in, i_CLKFB=ClockSignal(domain), i_RST=0, i_STDBY=0, i_PHASESEL0=0, i_PHASESEL1=0,
        i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
        o_CLKOP=ClockSignal(domain), o_LOCK=locked,
        a_FREQUENCY_PIN_CLKI=str(f_in / 1e6), a_FREQUENCY_PIN_CLKOP=str(f_out / 1e6), a_ICP_CURRENT="12",
        a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2")
    return locked


def _ice40_pll(m, clk_pin, f_in, f_out, domain):
    """An SB_PLL40_PAD making ``domain``'s clock from the oscillator's pin; returns the lock signal."""
    divr, divf, divq, filter_range = ice40_pll_params(f_in, f_out)
    locked = Signal()
    m.submodules.pll = Instance(
        "SB_PLL40_PAD", p_FEEDBACK_PATH="SIMPLE", p_DIVR=divr, p_DIVF=divf, p_DIVQ=divq,
        p_FILTER_RANGE=filter_range, i_PACKAGEPIN=clk_pin, i_RESETB=1, i_BYPASS=0,
        o_PLLOUTGLOBAL=ClockSignal(domain), o_LOCK=locked)
    return locked


class PlatformTop(Elaboratable):
    """A board's pins around :class:`ambert.hw.board.BoardTop`: the clock (through a PLL when the board's
    oscillator is not ``board.clock(size)``), a reset held until the PLL locks and for 2**16 cycles after,
    the UART and the status LEDs."""

    def __init__(self, board, size):
        self.board, self.size = board, size
        self.config = board.config(size)
        self.clock_hz = board.clock(size)

    def elaborate(self, platform):
        b = self.board
        m = Module()
        m.domains.sync = cd = ClockDomain("sync", reset_less=False)
        f_osc = platform.default_clk_frequency
        osc = platform.request(platform.default_clk, dir="-")
        if b.family == "ice40" and abs(f_osc - self.clock_hz) >= 1:
            locked = _ice40_pll(m, osc.io, f_osc, self.clock_hz, "sync")   # the PLL sits on the clock's pad
        else:
            m.submodules.osc_buf = osc_buf = io.Buffer("i", osc)
            if abs(f_osc - self.clock_hz) < 1:
                m.d.comb += cd.clk.eq(osc_buf.i)
                locked = Const(1)
            else:
                locked = _ecp5_pll(m, osc_buf.i, f_osc, self.clock_hz, "sync")
        platform.add_clock_constraint(cd.clk, self.clock_hz)

        # power-on reset: count in a reset-less domain of the same clock, release after the PLL locks
        m.domains.por = por = ClockDomain("por", reset_less=True)
        m.d.comb += por.clk.eq(cd.clk)
        count = Signal(17)
        with m.If(~locked):
            m.d.por += count.eq(0)
        with m.Elif(~count[-1]):
            m.d.por += count.eq(count + 1)
        m.d.comb += ResetSignal("sync").eq(~count[-1])

        m.submodules.board = top = BoardTop(self.config, divisor=b.divisor(self.size),
                                            retry_cycles=int(RETRY_S * self.clock_hz))
        uart = platform.request("uart", b.uart, dir="-")
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [top.rx.eq(rx_buf.i), tx_buf.o.eq(top.tx)]
        for k in range(b.leds):
            m.submodules[f"led{k}_buf"] = led = io.Buffer("o", platform.request("led", k, dir="-"))
            m.d.comb += led.o.eq(top.leds[k])
        return m
