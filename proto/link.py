"""The host link's protocol (docs/link.md): frame bytes, frame types, the header, CRC-32 and HELLO.

On the wire a frame is ``FLAG, stuffed(type, seq, len_lo, len_hi, payload…, crc32 LE), FLAG``. Stuffing
replaces ``FLAG`` and ``ESC`` inside a frame by ``ESC, byte ^ ESC_XOR``, so a FLAG only ever delimits: a
receiver that lost its place (noise, a dropped byte, a reset) is back in step at the next FLAG. The
CRC (:data:`CRC32`, IEEE 802.3) covers header and payload. The host's codec (:mod:`ambert.sw.link`) and
the board's (:mod:`ambert.hw.link`) both take every constant here.
"""

import enum
import struct
import zlib

from amaranth.lib.crc import catalog

from .isa import ISA_VERSION, DeviceShape

__all__ = ["FLAG", "ESC", "ESC_XOR", "MAX_PAYLOAD", "FRAME_HEADER", "FrameType", "CRC32", "CRC32_POLY_REFLECTED",
           "CRC32_RESIDUE", "crc32", "crc32_byte", "LINK_VERSION", "ProtocolError", "Hello"]

FLAG, ESC, ESC_XOR = 0x7E, 0x7D, 0x20
MAX_PAYLOAD = 1024              # the most any endpoint may announce; boards announce what they buffer
FRAME_HEADER = struct.Struct("<BBH")        # type, sequence number, payload length


class FrameType(enum.IntEnum):
    HELLO = 0x01    # host: (re)start the link; device: the same, answered with its description
    DATA = 0x02     # 32-bit words of the accelerator's streams, little-endian
    ACK = 0x03      # seq = the next sequence number the sender of the ACK expects (cumulative)


# CRC-32/ISO-HDLC (Ethernet, zlib), a byte at a time: ``CRC32.compute(data)`` is the model and
# ``CRC32.create()`` a hardware processor; the board runs the same register, a byte a cycle.
CRC32 = catalog.CRC32_ETHERNET(data_width=8)
CRC32_POLY_REFLECTED = int(f"{CRC32.algorithm.polynomial:032b}"[::-1], 2)   # the register shifts right
# the register (initial all ones, before the final inversion) after data followed by its own CRC
CRC32_RESIDUE = CRC32.residue()


def crc32(data):
    """``CRC32.compute(data)``, at C speed: zlib's CRC-32 is the same algorithm (a test holds them equal)."""
    return zlib.crc32(bytes(data))


def crc32_byte(register, byte):
    """One byte through the reflected CRC-32 register, before the final inversion (Python ints)."""
    register ^= byte
    for _ in range(8):
        register = (register >> 1) ^ ((register & 1) * CRC32_POLY_REFLECTED)
    return register


LINK_VERSION = 1


class ProtocolError(ValueError):
    """Bytes that do not follow this protocol."""


class Hello:
    """What a board says about itself in its HELLO: link and ISA versions, array and pool shape, and the
    largest payload and window it buffers."""

    LAYOUT = struct.Struct("<BBBBIIHH")

    def __init__(self, link_version, isa_version, lanes, banks, bank_words, acc_depth, max_payload, window):
        self.link_version, self.isa_version = link_version, isa_version
        self.lanes, self.banks, self.bank_words, self.acc_depth = lanes, banks, bank_words, acc_depth
        self.max_payload, self.window = max_payload, window

    def pack(self):
        return self.LAYOUT.pack(self.link_version, self.isa_version, self.lanes, self.banks, self.bank_words,
                                self.acc_depth, self.max_payload, self.window)

    @classmethod
    def of(cls, shape, max_payload, window):
        """The HELLO of a device of ``shape`` speaking this link and ISA version."""
        return cls(LINK_VERSION, ISA_VERSION, shape.lanes, shape.banks, shape.bank_words, shape.acc_depth,
                   max_payload, window)

    @property
    def shape(self):
        """The device's :class:`DeviceShape`; ProtocolError if it is not one ambert builds."""
        try:
            return DeviceShape(self.lanes, self.banks, self.bank_words, self.acc_depth)
        except ValueError as e:
            raise ProtocolError(f"the board reports an impossible shape: {e}") from None

    @classmethod
    def unpack(cls, payload):
        if len(payload) != cls.LAYOUT.size:
            raise ProtocolError(f"HELLO of {len(payload)} bytes, expected {cls.LAYOUT.size}: not an ambert board?")
        return cls(*cls.LAYOUT.unpack(payload))

    def __repr__(self):
        return (f"Hello(link v{self.link_version}, ISA v{self.isa_version}, {self.lanes}x{self.lanes}, "
                f"{self.banks} x {self.bank_words} words, acc {self.acc_depth}, payload {self.max_payload}, "
                f"window {self.window})")
