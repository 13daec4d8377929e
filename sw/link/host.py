"""The host end of the board link: handshake, then instruction streams out and answers back."""

import time

import numpy as np

from ambert.proto.link import LINK_VERSION, FrameType, Hello, ProtocolError

from .arq import Endpoint, LinkError
from .frame import Frame

__all__ = ["BoardLink"]


class BoardLink:
    """Talk to a board over a byte ``transport`` (see :class:`ambert.sw.link.SerialTransport`).

    ``handshake()`` (re)starts the link and returns the board's :class:`Hello`; ``run(words, expect)``
    sends an instruction stream and returns the ``expect`` answer words. Raises :class:`LinkError` when
    the board stops answering for ``stall_s`` seconds, resets, or is not an ambert board.
    """

    def __init__(self, transport, stall_s=10.0, retry_s=0.05, max_retries=40):
        self.transport = transport
        self.stall_s = stall_s
        self.hello = None
        self._got_hello = None
        self.endpoint = Endpoint(transport, retry_s=retry_s, max_retries=max_retries, on_hello=self._on_hello)

    def _on_hello(self, frame):
        if self._got_hello is not None:
            raise LinkError("the board reset during the transfer (it announced itself again)")
        self._got_hello = frame

    def handshake(self, attempts=5, wait_s=0.5, settle_s=0.1):
        """Send HELLO until the board answers with its own; both ends restart at sequence 0."""
        for _ in range(attempts):
            self._got_hello = None
            self.endpoint.reset()
            self.endpoint.send_frame(Frame(FrameType.HELLO, 0))
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self._got_hello is None:
                self.endpoint.poll(0.01)
            if self._got_hello is not None:
                # a board that just powered up announced itself too: take every HELLO still on its way
                # before the first DATA, so none is later mistaken for a reset
                settle = time.monotonic() + settle_s
                while time.monotonic() < settle:
                    self._got_hello, first = None, self._got_hello
                    self.endpoint.poll(0.01)
                    self._got_hello = self._got_hello or first
                try:
                    hello = Hello.unpack(self._got_hello.payload)
                except ProtocolError as e:
                    raise LinkError(str(e)) from None
                if hello.link_version != LINK_VERSION:
                    raise LinkError(f"the board speaks link version {hello.link_version}, this host "
                                    f"{LINK_VERSION}")
                self.endpoint.reset()
                self.endpoint.window = min(self.endpoint.window, hello.window) or 1
                self.endpoint.max_payload = min(256, hello.max_payload) // 4 * 4
                self.hello = hello
                self._got_hello = hello          # from now on another HELLO means the board reset
                return hello
        raise LinkError(f"no answer to HELLO after {attempts} attempts: is an ambert board on this port?")

    def run(self, words, expect, progress=None):
        """Send ``words`` (32-bit ints); return the first ``expect`` answer words."""
        if self.hello is None:
            raise LinkError("handshake() first")
        ep = self.endpoint
        ep.received.clear()
        ep.queue(np.asarray(words, dtype="<u4").tobytes())
        want = 4 * expect
        last, seen = time.monotonic(), (ep.bytes_received, len(ep.pending), len(ep.unacked))
        while not (ep.idle and len(ep.received) >= want):
            ep.poll(0.01)
            now = (ep.bytes_received, len(ep.pending), len(ep.unacked))
            if now != seen:
                last, seen = time.monotonic(), now
                if progress:
                    progress(len(ep.received) // 4)
            elif time.monotonic() - last > self.stall_s:
                raise LinkError(f"the board stopped answering: {len(ep.pending) + len(ep.unacked)} frames "
                                f"unsent or unacknowledged, {len(ep.received) // 4}/{expect} answers")
        data = bytes(ep.received[:want])
        del ep.received[:want]
        return np.frombuffer(data, dtype="<u4").tolist()

    def close(self):
        self.transport.close()
