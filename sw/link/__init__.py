"""The host link to a dev board (docs/link.md): frames, reliable delivery, the host end."""

from .arq import LINK_VERSION, Endpoint, Hello, LinkError, SerialTransport
from .frame import Frame, FrameType
from .host import BoardLink

__all__ = ["LINK_VERSION", "Endpoint", "Hello", "LinkError", "SerialTransport", "Frame", "FrameType",
           "BoardLink"]
