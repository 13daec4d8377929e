"""Reliable delivery over the framed link (docs/link.md): go-back-N with cumulative acknowledgements.

Both ends run the same :class:`Endpoint`. DATA frames carry 8-bit sequence numbers; at most ``window``
are unacknowledged at a time; every DATA frame received is answered with an ACK naming the next
sequence number expected, so duplicates and frames after a gap are dropped and re-acknowledged. When the
oldest frame waits longer than ``retry_s`` the sender sends every unacknowledged frame again; after
``max_retries`` rounds without progress the link is declared dead.
"""

import time
from collections import deque

from ambert.proto.link import FrameType

from .frame import Decoder, Frame, encode

__all__ = ["LinkError", "Endpoint", "SerialTransport"]


class LinkError(RuntimeError):
    """The other end stopped answering, reset, or spoke another protocol."""


class SerialTransport:
    """The byte transport over a pyserial port (a UART, or a pseudo-terminal)."""

    def __init__(self, port):
        self.port = port

    def write(self, data):
        self.port.write(data)

    def read(self, timeout):
        self.port.timeout = timeout
        first = self.port.read(1)
        if not first:
            return b""
        waiting = self.port.in_waiting
        return first + (self.port.read(waiting) if waiting else b"")

    def close(self):
        self.port.close()


class Endpoint:
    """One end of the link over ``transport`` (``write(bytes)``, ``read(timeout) -> bytes``).

    ``queue(data)`` sends bytes (a multiple of 4) as DATA frames; ``received`` collects the payload of
    in-order DATA frames; ``poll(timeout)`` moves everything along once. HELLO frames go to ``on_hello``.
    """

    def __init__(self, transport, window=4, max_payload=256, retry_s=0.05, max_retries=20, on_hello=None,
                 clock=time.monotonic):
        if not 1 <= window <= 127:
            raise ValueError(f"window must be in [1, 127], not {window}")
        if max_payload < 4 or max_payload % 4:
            raise ValueError(f"max_payload must be a positive multiple of 4, not {max_payload}")
        self.transport = transport
        self.window, self.max_payload = window, max_payload
        self.retry_s, self.max_retries = retry_s, max_retries
        self.on_hello = on_hello
        self.clock = clock              # a benchmark models a UART on a virtual clock
        self.decoder = Decoder()
        self.reset()
        self.bytes_sent = self.bytes_received = self.retransmitted = 0

    def reset(self):
        """Back to sequence 0 both ways, nothing queued (both ends do this on HELLO)."""
        self.tx_next = self.tx_base = 0
        self.unacked = deque()          # wire bytes of each unacknowledged frame, oldest first
        self.pending = deque()          # payloads not yet framed
        self.rx_expected = 0
        self.received = bytearray()
        self.timer = self.clock()
        self.retries = 0

    @property
    def idle(self):
        """Nothing waiting to go or to be acknowledged."""
        return not self.pending and not self.unacked

    def queue(self, data):
        data = bytes(data)
        if len(data) % 4:
            raise ValueError(f"the link carries 32-bit words: {len(data)} bytes is not a multiple of 4")
        for i in range(0, len(data), self.max_payload):
            self.pending.append(data[i:i + self.max_payload])

    def send_frame(self, frame):
        wire = encode(frame)
        self.transport.write(wire)
        self.bytes_sent += len(wire)

    def poll(self, timeout=0.01):
        """Send what the window allows, take what arrived, retransmit what timed out."""
        while self.pending and len(self.unacked) < self.window:
            wire = encode(Frame(FrameType.DATA, self.tx_next, self.pending.popleft()))
            if not self.unacked:
                self.timer = self.clock()
            self.transport.write(wire)
            self.bytes_sent += len(wire)
            self.unacked.append(wire)
            self.tx_next = (self.tx_next + 1) & 0xFF
        data = self.transport.read(timeout)
        if data:
            self.bytes_received += len(data)
            for frame in self.decoder.feed(data):
                self._on_frame(frame)
        if self.unacked and self.clock() - self.timer > self.retry_s:
            self.retries += 1
            if self.retries > self.max_retries:
                raise LinkError(f"no acknowledgement after {self.max_retries} retransmissions "
                                f"({len(self.unacked)} frames outstanding)")
            for wire in self.unacked:                   # go back N
                self.transport.write(wire)
                self.bytes_sent += len(wire)
                self.retransmitted += 1
            self.timer = self.clock()

    def _on_frame(self, frame):
        if frame.type == FrameType.DATA:
            if frame.seq == self.rx_expected and len(frame.payload) % 4 == 0:
                self.received += frame.payload
                self.rx_expected = (self.rx_expected + 1) & 0xFF
            self.send_frame(Frame(FrameType.ACK, self.rx_expected))
        elif frame.type == FrameType.ACK:
            advanced = (frame.seq - self.tx_base) & 0xFF
            if 0 < advanced <= len(self.unacked):
                for _ in range(advanced):
                    self.unacked.popleft()
                self.tx_base = frame.seq
                self.retries = 0
                self.timer = self.clock()
        elif frame.type == FrameType.HELLO:
            if self.on_hello is None:
                raise LinkError("unexpected HELLO")
            self.on_hello(frame)
