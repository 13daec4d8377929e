"""The UART PHY of the host link: 8N1 bytes on one pin each way, at ``divisor`` clock cycles per bit."""

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UartTx", "UartRx", "line_levels"]


def line_levels(data, divisor, idle=0):
    """The model: the level of the line in each clock cycle carrying ``data`` (bytes) back to back, 8N1,
    LSB first, ``divisor`` cycles per bit, after ``idle`` cycles of idle line (high)."""
    levels = [1] * idle
    for byte in data:
        for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [1]:
            levels += [bit] * divisor
    return levels


class UartTx(wiring.Component):
    """Send each byte taken from ``i`` on ``tx``: a start bit, 8 data bits LSB first, a stop bit, each
    ``divisor`` cycles. Takes the next byte in the stop bit's last cycle, so bytes go back to back (10
    bits each, exactly :func:`line_levels`). ``tx`` idles high."""

    def __init__(self, divisor):
        if divisor < 2:
            raise ValueError(f"divisor must be at least 2 clock cycles per bit, not {divisor}")
        self.divisor = divisor
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        shift = Signal(10, init=0x3FF)           # stop, data[7:0], start: shifted out LSB first
        bits = Signal(range(11))                 # bits left to send
        count = Signal(range(self.divisor))
        m.d.comb += self.tx.eq(shift[0])
        last_cycle = (count == self.divisor - 1)
        with m.If(bits != 0):
            m.d.sync += count.eq(count + 1)
            with m.If(last_cycle):
                m.d.sync += [count.eq(0), shift.eq((shift >> 1) | (1 << 9)), bits.eq(bits - 1)]
        take = (bits == 0) | ((bits == 1) & last_cycle)
        m.d.comb += self.i.ready.eq(take)
        with m.If(self.i.valid & take):
            m.d.sync += [shift.eq((1 << 9) | (self.i.payload << 1)), bits.eq(10), count.eq(0)]
        return m


class UartRx(wiring.Component):
    """Receive 8N1 bytes from ``rx`` into ``o``. After two flip-flops against metastability the line is
    sampled in the middle of each bit; a start bit no longer low at its middle is a glitch and ignored; a
    byte whose stop bit is low is dropped and counts in ``framing_errors``. ``o`` holds one byte; one not
    taken before the next arrives is overwritten and counts in ``overruns`` (the link's CRC catches
    both). Tolerates a clock mismatch of a few percent."""

    def __init__(self, divisor):
        if divisor < 4:
            raise ValueError(f"divisor must be at least 4 clock cycles per bit, not {divisor}")
        self.divisor = divisor
        super().__init__({"rx": In(1, init=1), "o": Out(stream.Signature(8)),
                          "framing_errors": Out(16), "overruns": Out(16)})

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        sync1, line = Signal(init=1), Signal(init=1)
        m.d.sync += [sync1.eq(self.rx), line.eq(sync1)]
        count = Signal(range(d + d // 2 + 1))
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
                with m.If(count == d // 2 - 1):
                    with m.If(line):
                        m.next = "IDLE"                  # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += [count.eq(0), bit.eq(0)]
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += count.eq(count + 1)
                with m.If(count == d - 1):
                    m.d.sync += [count.eq(0), data.eq((data >> 1) | (line << 7)), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += count.eq(count + 1)
                with m.If(count == d - 1):
                    with m.If(line):
                        m.d.sync += [self.o.payload.eq(data), self.o.valid.eq(1)]
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.sync += self.overruns.eq(self.overruns + 1)
                    with m.Else():
                        m.d.sync += self.framing_errors.eq(self.framing_errors + 1)
                    m.next = "IDLE"
        return m
