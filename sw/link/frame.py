"""The host's frame codec (the protocol: :mod:`ambert.proto.link`): HDLC-style byte stuffing, a 4-byte
header, CRC-32."""

import struct
from dataclasses import dataclass

from ambert.proto.link import ESC, ESC_XOR, FLAG, FRAME_HEADER, MAX_PAYLOAD, FrameType, crc32

__all__ = ["Frame", "encode", "Decoder"]

_FLAG, _ESC = bytes([FLAG]), bytes([ESC])
# each byte that stuffing replaces, and what replaces it
_STUFFED = [(bytes([b]), bytes([ESC, b ^ ESC_XOR])) for b in (ESC, FLAG)]


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""


def _stuff(raw):
    for byte, escaped in _STUFFED:            # ESC first, so the ESCs it adds are not escaped again
        raw = raw.replace(byte, escaped)
    return raw


def _unstuff(stuffed):
    for byte, escaped in reversed(_STUFFED):
        stuffed = stuffed.replace(escaped, byte)
    return stuffed


def encode(frame):
    """The bytes that carry ``frame`` on the wire."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    raw = FRAME_HEADER.pack(int(frame.type), frame.seq & 0xFF, len(frame.payload)) + bytes(frame.payload)
    raw += struct.pack("<I", crc32(raw))
    return _FLAG + _stuff(raw) + _FLAG


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
        raw = _unstuff(stuffed)
        if len(raw) < FRAME_HEADER.size + 4:
            return None
        body, crc = raw[:-4], struct.unpack("<I", raw[-4:])[0]
        if crc32(body) != crc:
            return None
        kind, seq, length = FRAME_HEADER.unpack(body[:FRAME_HEADER.size])
        payload = body[FRAME_HEADER.size:]
        if length != len(payload) or length > self.max_payload or kind not in FrameType._value2member_map_:
            return None
        return Frame(FrameType(kind), seq, payload)


def _valid_escapes(stuffed):
    i = stuffed.find(_ESC)
    while i >= 0:
        if i + 1 >= len(stuffed) or stuffed[i + 1] ^ ESC_XOR not in (ESC, FLAG):
            return False
        i = stuffed.find(_ESC, i + 2)
    return True


def _flag_positions(data):
    """Split ``data`` at FLAG bytes: yields (bytes before the flag, True) for each flag, then the rest."""
    data = bytes(data)
    start = 0
    while True:
        i = data.find(_FLAG, start)
        if i < 0:
            if start < len(data):
                yield data[start:], False
            return
        yield data[start:i], True
        start = i + 1
