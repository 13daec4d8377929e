"""The UART PHY of the host link: 8N1 bytes on one pin each way, at ``divisor`` clock cycles per bit.

``divisor`` is the clock over the baud rate: an integer, or a :class:`fractions.Fraction` where the baud
rate does not divide the clock (3 Mbaud at 100 MHz: 100/3). Then the bits of a byte last ``floor(d)`` or
``floor(d) + 1`` cycles, bit ``k`` ending ``floor((k + 1) d)`` cycles after the byte's start: every edge
within a cycle of where it belongs.
"""

from fractions import Fraction
from math import floor

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UartTx", "UartRx", "line_levels"]


def _split(divisor, least):
    d = Fraction(divisor)
    if d < least:
        raise ValueError(f"divisor must be at least {least} clock cycles per bit, not {divisor}")
    return floor(d), d.numerator % d.denominator, d.denominator


def line_levels(data, divisor, idle=0):
    """The model: the level of the line in each clock cycle carrying ``data`` (bytes) back to back, 8N1,
    LSB first, ``divisor`` cycles per bit (see the module's note for a fraction), after ``idle`` cycles of
    idle line (high)."""
    d = Fraction(divisor)
    levels = [1] * idle
    for byte in data:
        for k, bit in enumerate([0] + [(byte >> i) & 1 for i in range(8)] + [1]):
            levels += [bit] * (floor((k + 1) * d) - floor(k * d))
    return levels


def _bit_timer(m, n, r, q, extra_name):
    """A bit's length, ``n`` or ``n + 1`` cycles: ``(last, next_bit, restart)`` — ``last`` is the bit's last
    cycle given a counter's ``count``; ``next_bit`` and ``restart`` are the statements for a bit's end
    and a byte's start (the remainder ``r / q`` accumulated a bit at a time from zero)."""
    if r == 0:
        return (lambda count: count == n - 1), [], []
    phase = Signal(range(q), name=f"{extra_name}_phase")
    extra = Signal(name=extra_name)
    m.d.comb += extra.eq(phase + r >= q)
    return ((lambda count: count == n - 1 + extra),
            [phase.eq(phase + r - q * extra)], [phase.eq(0)])


class UartTx(wiring.Component):
    """Send each byte taken from ``i`` on ``tx``: a start bit, 8 data bits LSB first, a stop bit, each
    ``divisor`` cycles (an integer or a fraction, as in the module's note). Takes the next byte in the
    stop bit's last cycle, so bytes go back to back (10 bits each, exactly :func:`line_levels`). ``tx``
    idles high."""

    def __init__(self, divisor):
        self.n, self.r, self.q = _split(divisor, 2)
        self.divisor = divisor
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        shift = Signal(10, init=0x3FF)           # stop, data[7:0], start: shifted out LSB first
        bits = Signal(range(11))                 # bits left to send
        count = Signal(range(self.n + 1))
        m.d.comb += self.tx.eq(shift[0])
        last, next_bit, restart = _bit_timer(m, self.n, self.r, self.q, "tx_extra")
        last_cycle = last(count)
        with m.If(bits != 0):
            m.d.sync += count.eq(count + 1)
            with m.If(last_cycle):
                m.d.sync += [count.eq(0), shift.eq((shift >> 1) | (1 << 9)), bits.eq(bits - 1), *next_bit]
        take = (bits == 0) | ((bits == 1) & last_cycle)
        m.d.comb += self.i.ready.eq(take)
        with m.If(self.i.valid & take):
            m.d.sync += [shift.eq((1 << 9) | (self.i.payload << 1)), bits.eq(10), count.eq(0), *restart]
        return m


class UartRx(wiring.Component):
    """Receive 8N1 bytes from ``rx`` into ``o``. After two flip-flops against metastability the line is
    sampled in the middle of each bit; a start bit no longer low at its middle is a glitch and ignored; a
    byte whose stop bit is low is dropped and counts in ``framing_errors``. ``o`` holds one byte; one not
    taken before the next arrives is overwritten and counts in ``overruns`` (the link's CRC catches
    both). Tolerates a clock mismatch of a few percent. ``divisor``: an integer or a fraction (the
    module's note), the bits after the start bit timed as the transmitter's."""

    def __init__(self, divisor):
        self.n, self.r, self.q = _split(divisor, 4)
        self.divisor = divisor
        super().__init__({"rx": In(1, init=1), "o": Out(stream.Signature(8)),
                          "framing_errors": Out(16), "overruns": Out(16)})

    def elaborate(self, platform):
        m = Module()
        n, half = self.n, floor(Fraction(self.divisor) / 2)
        sync1, line = Signal(init=1), Signal(init=1)
        m.d.sync += [sync1.eq(self.rx), line.eq(sync1)]
        last, next_bit, restart = _bit_timer(m, self.n, self.r, self.q, "rx_extra")
        count = Signal(range(n + 1))
        bit = Signal(range(9))
        data = Signal(8)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += count.eq(0)
                    m.next = "START"
            with m.State("START"):
                m.d.sync += count.eq(count + 1)
                with m.If(count == half - 1):
                    with m.If(line):
                        m.next = "IDLE"                  # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += [count.eq(0), bit.eq(0), *restart]
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += count.eq(count + 1)
                with m.If(last(count)):
                    m.d.sync += [count.eq(0), data.eq((data >> 1) | (line << 7)), bit.eq(bit + 1), *next_bit]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += count.eq(count + 1)
                with m.If(last(count)):
                    with m.If(line):
                        m.d.sync += [self.o.payload.eq(data), self.o.valid.eq(1)]
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.sync += self.overruns.eq(self.overruns + 1)
                    with m.Else():
                        m.d.sync += self.framing_errors.eq(self.framing_errors + 1)
                    m.next = "IDLE"
        return m
