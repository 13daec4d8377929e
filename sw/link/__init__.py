"""The host end of the link to a dev board (docs/link.md): the frame codec, reliable delivery, the
handshake. The protocol itself is :mod:`ambert.proto.link`."""

from .arq import Endpoint, LinkError, SerialTransport
from .frame import Frame
from .host import BoardLink

__all__ = ["Endpoint", "LinkError", "SerialTransport", "Frame", "BoardLink"]
