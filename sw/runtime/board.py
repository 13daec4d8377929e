"""A dev board on a serial port (or a virtual board on a pseudo-terminal): the same programs as the
simulated device, carried by the framed link (docs/link.md). The board says what it is — array shape,
pool size — in its HELLO, and the compiler compiles for exactly that."""

from ambert.proto.isa import ISA_VERSION
from ambert.proto.link import ProtocolError
from ambert.sw.link import BoardLink, LinkError, SerialTransport

from .accel import AcceleratorDevice
from .base import DeviceError

__all__ = ["BoardDevice", "DEFAULT_BAUD"]

DEFAULT_BAUD = 3_000_000


class BoardDevice(AcceleratorDevice):
    name = "board"

    def __init__(self, port, baud=DEFAULT_BAUD, stall_s=10.0, retry_s=0.05):
        """``port``: a serial device path (``/dev/ttyUSB1``, a pty) or an open pyserial-like object."""
        self.port_name = port if isinstance(port, str) else getattr(port, "name", "?")
        try:
            if isinstance(port, str):
                import serial
                port = serial.Serial(port, baudrate=baud, timeout=0.01)
            self.link = BoardLink(SerialTransport(port), stall_s=stall_s, retry_s=retry_s)
            hello = self.link.handshake()
        except (OSError, LinkError) as e:
            raise DeviceError(f"no board on {self.port_name}: {e}") from None
        if hello.isa_version != ISA_VERSION:
            raise DeviceError(f"the board on {self.port_name} runs ISA v{hello.isa_version}; this host "
                              f"compiles for v{ISA_VERSION}: rebuild its bitstream")
        try:
            shape = hello.shape
        except ProtocolError as e:
            raise DeviceError(f"the board on {self.port_name}: {e}") from None
        self.hello = hello
        self.lost = False
        super().__init__(shape)

    def _run(self, words, expect):
        if self.lost:
            # it stopped answering before: one quick knock, then let the fallback take the work
            self._reset_device(attempts=1)
            if self.lost:
                raise DeviceError(f"board on {self.port_name} is not answering")
        try:
            return self.link.run(words, expect)
        except (LinkError, OSError) as e:
            self._reset()           # the pool and the link state are unknown now: start both over
            raise DeviceError(f"board on {self.port_name}: {e}") from None

    def _reset_device(self, attempts=3):
        # a fresh handshake restarts the link and resets the accelerator: the pool is empty again
        try:
            self.link.handshake(attempts=attempts, wait_s=0.3)
            self.lost = False
        except (LinkError, OSError):
            self.lost = True

    def close(self):
        self.link.close()
