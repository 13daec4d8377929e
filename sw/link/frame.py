"""Frames of the host link (docs/link.md): HDLC-style byte stuffing, a 4-byte header, CRC-32.

On the wire a frame is ``FLAG, stuffed(type, seq, len_lo, len_hi, payload…, crc32 LE), FLAG``. Stuffing
replaces ``FLAG`` (0x7E) and ``ESC`` (0x7D) inside a frame by ``ESC, byte ^ 0x20``, so a FLAG only ever
delimits: a receiver that lost its place (noise, a dropped byte, a reset) is back in step at the next
FLAG. The CRC (IEEE 802.3, as ``zlib.crc32``) covers header and payload.
"""

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = ["FLAG", "ESC", "MAX_PAYLOAD", "FrameType", "Frame", "encode", "Decoder"]

FLAG, ESC = 0x7E, 0x7D
MAX_PAYLOAD = 1024              # the most any endpoint may announce; boards announce what they buffer
_HEADER = struct.Struct("<BBH")


class FrameType(enum.IntEnum):
    HELLO = 0x01    # host: (re)start the link; device: the same, answered with its description
    DATA = 0x02     # 32-bit words of the accelerator's streams, little-endian
    ACK = 0x03      # seq = the next sequence number the sender of the ACK expects (cumulative)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""


def _stuff(raw):
    return raw.replace(b"\x7d", b"\x7d\x5d").replace(b"\x7e", b"\x7d\x5e")


def encode(frame):
    """The bytes that carry ``frame`` on the wire."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    raw = _HEADER.pack(int(frame.type), frame.seq & 0xFF, len(frame.payload)) + bytes(frame.payload)
    raw += struct.pack("<I", zlib.crc32(raw))
    return b"\x7e" + _stuff(raw) + b"\x7e"


class Decoder:
    """Feed received bytes; get whole, CRC-checked frames. Anything else — noise between frames, a
    frame cut short, a bad CRC, a length that disagrees, an unknown type — is dropped and counted."""

    def __init__(self, max_payload=MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._in_frame = False
        self.dropped = 0

    def feed(self, data):
        """Consume ``data`` (bytes); return the list of frames completed by it."""
        frames = []
        for chunk_end in _flag_positions(data):
            part, is_flag = chunk_end
            if self._in_frame:
                self._buf += part
                if len(self._buf) > 2 * (self.max_payload + 8) + 2:
                    self._buf.clear()               # runaway: wait for the next FLAG
                    self._in_frame = False
                    self.dropped += 1
                    continue
            if is_flag:
                if self._in_frame and self._buf:
                    frame = self._parse(bytes(self._buf))
                    if frame is None:
                        self.dropped += 1
                    else:
                        frames.append(frame)
                self._buf.clear()
                self._in_frame = True               # a FLAG both ends one frame and may start the next
        return frames

    def _parse(self, stuffed):
        if not _valid_escapes(stuffed):
            return None
        raw = stuffed.replace(b"\x7d\x5e", b"\x7e").replace(b"\x7d\x5d", b"\x7d")
        if len(raw) < _HEADER.size + 4:
            return None
        body, crc = raw[:-4], struct.unpack("<I", raw[-4:])[0]
        if zlib.crc32(body) != crc:
            return None
        kind, seq, length = _HEADER.unpack(body[:_HEADER.size])
        payload = body[_HEADER.size:]
        if length != len(payload) or length > self.max_payload or kind not in FrameType._value2member_map_:
            return None
        return Frame(FrameType(kind), seq, payload)


def _valid_escapes(stuffed):
    i = stuffed.find(b"\x7d")
    while i >= 0:
        if i + 1 >= len(stuffed) or stuffed[i + 1] not in (0x5D, 0x5E):
            return False
        i = stuffed.find(b"\x7d", i + 2)
    return True


def _flag_positions(data):
    """Split ``data`` at FLAG bytes: yields (bytes before the flag, True) for each flag, then the rest."""
    data = bytes(data)
    start = 0
    while True:
        i = data.find(b"\x7e", start)
        if i < 0:
            if start < len(data):
                yield data[start:], False
            return
        yield data[start:i], True
        start = i + 1
