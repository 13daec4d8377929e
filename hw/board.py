"""The board top: UART PHY <-> link endpoint <-> accelerator, the same for every board and the virtual one."""

from amaranth import Cat, ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ambert.proto.link import Hello

from .config import AcceleratorConfig
from .link import LinkEndpoint
from .top import Accelerator
from .uart import UartRx, UartTx

__all__ = ["BoardTop", "hello_payload", "LINK_MAX_PAYLOAD", "LINK_WINDOW"]

LINK_MAX_PAYLOAD, LINK_WINDOW = 256, 4


def hello_payload(config, max_payload=LINK_MAX_PAYLOAD, window=LINK_WINDOW):
    """The bytes a board announces in its HELLO (docs/link.md): what the runtime compiles for."""
    return Hello.of(config.shape, max_payload, window).pack()


class BoardTop(wiring.Component):
    """The accelerator behind the host link, on two pins.

    ``rx``/``tx``: the UART lines (8N1, ``divisor`` clock cycles per bit: the clock over the baud rate, a
    :class:`~fractions.Fraction` where the baud rate does not divide the clock).
    A HELLO from the host resets the accelerator and the link; after power-on or a reset the board
    announces itself with a HELLO. ``retry_cycles``: how long the oldest unacknowledged answer frame
    waits before go-back-N (pick about 50 ms of the board's clock: the host's USB latency is in it).

    ``leds``: 0 the link has work in hand, 1 the accelerator is busy, 2 a sticky accelerator error,
    3 toggles on every damaged frame received. ``busy`` and ``active`` are for the simulation harness:
    nothing is left to do when both are low.
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)
    leds: Out(4)
    busy: Out(1)
    active: Out(1)

    def __init__(self, config=AcceleratorConfig(), divisor=4, retry_cycles=1_000_000,
                 max_payload=LINK_MAX_PAYLOAD, window=LINK_WINDOW):
        self.config, self.divisor, self.retry_cycles = config, divisor, retry_cycles
        self.max_payload, self.window = max_payload, window
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart_rx = urx = UartRx(self.divisor)
        m.submodules.uart_tx = utx = UartTx(self.divisor)
        m.submodules.link = link = LinkEndpoint(hello_payload(self.config, self.max_payload, self.window),
                                                self.max_payload, self.window, self.retry_cycles)
        # the host's HELLO restarts the accelerator as well as the link: the pool's contents are gone. The
        # accelerator runs in a domain of the same clock whose reset is one flip-flop, set by the board's
        # reset and a cycle after a HELLO, so the frame's decoding does not fan out to every resettable
        # register of the accelerator in the same cycle. In that cycle no word passes between the link
        # and the accelerator.
        accel_reset = Signal(init=1)
        m.d.sync += accel_reset.eq(link.accel_reset)
        m.domains.accel = ClockDomain("accel", local=True)
        m.d.comb += [ClockSignal("accel").eq(ClockSignal()), ResetSignal("accel").eq(accel_reset)]
        m.submodules.accel = accel = DomainRenamer("accel")(Accelerator(self.config))
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx)]
        wiring.connect(m, urx.o, link.rx)
        wiring.connect(m, link.tx, utx.i)
        # the link's words leave its frame buffer (a block RAM) and go straight into the sequencer's
        # decoder: a registered two-word FIFO between them takes the RAM's clock-to-out off the decoder's
        # paths. A HELLO empties it with the accelerator.
        m.submodules.in_fifo = in_fifo = DomainRenamer("accel")(SyncFIFOBuffered(width=32, depth=2))
        m.d.comb += [in_fifo.w_stream.payload.eq(link.o.payload),
                     in_fifo.w_stream.valid.eq(link.o.valid & ~accel_reset),
                     link.o.ready.eq(in_fifo.w_stream.ready & ~accel_reset),
                     link.i.payload.eq(accel.o.payload),
                     link.i.valid.eq(accel.o.valid & ~accel_reset),
                     accel.o.ready.eq(link.i.ready & ~accel_reset)]
        wiring.connect(m, in_fifo.r_stream, accel.i)

        bad_seen = Signal()
        last_bad = Signal.like(link.bad_frames)
        m.d.sync += last_bad.eq(link.bad_frames)
        with m.If(link.bad_frames != last_bad):
            m.d.sync += bad_seen.eq(~bad_seen)
        m.d.comb += [self.busy.eq(accel.busy), self.active.eq(link.active),
                     self.leds.eq(Cat(link.active, accel.busy, accel.error != 0, bad_seen))]
        return m

