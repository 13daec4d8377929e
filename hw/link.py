"""The device end of the host link, in hardware (docs/link.md). So far: CRC-32, the deframer, the framer.

The golden model is the host's own code: :class:`sw.link.frame.Decoder` decides which frames are good,
and the tests compare the deframer against it byte stream for byte stream.
"""

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["crc32_byte", "crc32_byte_logic", "CRC32_RESIDUE", "LinkDeframer", "LinkFramer"]

CRC32_POLY = 0xEDB88320     # IEEE 802.3, reflected (zlib.crc32)
# the register after running the CRC (init all ones, no final inversion) over data and then its CRC
CRC32_RESIDUE = 0xDEBB20E3


def crc32_byte(crc, byte):
    """The model: one byte through the reflected CRC-32 register (Python ints)."""
    crc ^= byte
    for _ in range(8):
        crc = (crc >> 1) ^ ((crc & 1) * CRC32_POLY)
    return crc


def _crc32_taps():
    """CRC is linear over GF(2): output bit i of :func:`crc32_byte` is the XOR of the register and byte
    bits listed here (register bits 0-31, byte bits 32-39)."""
    taps = [[] for _ in range(32)]
    for k in range(40):
        out = crc32_byte(1 << k, 0) if k < 32 else crc32_byte(0, 1 << (k - 32))
        for i in range(32):
            if out >> i & 1:
                taps[i].append(k)
    return taps


_TAPS = _crc32_taps()


def crc32_byte_logic(crc, byte):
    """:func:`crc32_byte` as logic: one XOR tree per register bit, a byte per cycle."""
    bits = [crc[k] for k in range(32)] + [byte[k] for k in range(8)]
    out = []
    for taps in _TAPS:
        x = bits[taps[0]]
        for k in taps[1:]:
            x = x ^ bits[k]
        out.append(x)
    return Cat(*out)


class LinkDeframer(wiring.Component):
    """Bytes from the UART in ``i``; whole, checked frames out.

    Frames are ``FLAG, stuffed(type, seq, len LE16, payload, CRC-32 LE), FLAG``. The deframer unstuffs,
    runs the CRC over every byte and keeps the payload in its buffer (``max_payload`` bytes as 32-bit
    words, little-endian). A frame is good when the CRC register ends on :data:`CRC32_RESIDUE`, its
    length matches its bytes, it fits the buffer, its escapes are valid and its type is known — the
    rules of :class:`sw.link.frame.Decoder`. A good frame raises ``frame_valid`` with ``frame_type``,
    ``frame_seq`` and ``frame_len`` and holds them, with the payload readable at ``rd_addr``/``rd_data``
    (one cycle of latency), until ``frame_done``. Frames that end while one is held are dropped and
    counted in ``busy_drops`` (the host resends them); bad ones count in ``bad_frames``. ``i`` is
    always ready: the UART cannot wait.
    """

    def __init__(self, max_payload=256):
        if max_payload % 4 or not 4 <= max_payload <= 1024:
            raise ValueError(f"max_payload must be a multiple of 4 in [4, 1024], not {max_payload}")
        self.max_payload = max_payload
        self.words = max_payload // 4
        super().__init__({
            "i": In(stream.Signature(8)),
            "frame_valid": Out(1), "frame_type": Out(8), "frame_seq": Out(8), "frame_len": Out(16),
            "frame_done": In(1),
            "rd_addr": In(range(self.words)), "rd_data": Out(32),
            "bad_frames": Out(16), "busy_drops": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = memory.Memory(shape=32, depth=self.words, init=[])
        wr, rd = buf.write_port(granularity=8), buf.read_port()
        m.d.comb += [rd.addr.eq(self.rd_addr), self.rd_data.eq(rd.data), self.i.ready.eq(1)]

        crc = Signal(32, init=0xFFFFFFFF)
        count = Signal(range(self.max_payload + 16))     # unstuffed bytes of this frame so far
        escaped, broken = Signal(), Signal()              # last byte was ESC; the frame is spoilt
        unkept = Signal()                                 # some payload arrived while a frame was held
        hdr = [Signal(8, name=f"hdr{n}") for n in range(4)]
        length = Signal(16)
        m.d.comb += length.eq(hdr[2] | (hdr[3] << 8))
        byte = Signal(8)
        have = Signal()

        with m.If(self.frame_valid & self.frame_done):
            m.d.sync += self.frame_valid.eq(0)

        def restart():
            m.d.sync += [crc.eq(0xFFFFFFFF), count.eq(0), escaped.eq(0), broken.eq(0), unkept.eq(0)]

        with m.If(self.i.valid):
            with m.If(self.i.payload == 0x7E):
                # a FLAG ends a frame (if any bytes came) and starts the next
                good = (~broken & ~escaped & (crc == CRC32_RESIDUE) & (count == length + 8)
                        & (length <= self.max_payload) & (hdr[0] >= 1) & (hdr[0] <= 3))
                with m.If(count != 0):
                    with m.If(~good):
                        m.d.sync += self.bad_frames.eq(self.bad_frames + 1)
                    with m.Elif(unkept | (self.frame_valid & ~self.frame_done)):
                        m.d.sync += self.busy_drops.eq(self.busy_drops + 1)
                    with m.Else():
                        m.d.sync += [self.frame_valid.eq(1), self.frame_type.eq(hdr[0]),
                                     self.frame_seq.eq(hdr[1]), self.frame_len.eq(length)]
                restart()
            with m.Elif(escaped):
                m.d.sync += escaped.eq(0)
                with m.If((self.i.payload == 0x5E) | (self.i.payload == 0x5D)):
                    m.d.comb += [byte.eq(self.i.payload ^ 0x20), have.eq(1)]
                with m.Else():
                    m.d.sync += broken.eq(1)
            with m.Elif(self.i.payload == 0x7D):
                m.d.sync += escaped.eq(1)
            with m.Else():
                m.d.comb += [byte.eq(self.i.payload), have.eq(1)]

        held = self.frame_valid & ~self.frame_done
        with m.If(have):
            m.d.sync += crc.eq(crc32_byte_logic(crc, byte))
            for n in range(4):
                with m.If(count == n):
                    m.d.sync += hdr[n].eq(byte)
            with m.If(count < self.max_payload + 8):
                m.d.sync += count.eq(count + 1)
            with m.Else():
                m.d.sync += broken.eq(1)                   # longer than any good frame
            # payload bytes (and the CRC bytes after them, harmlessly) into the buffer; while a frame
            # is held there the new one cannot be kept, and is dropped when it ends
            pos = count - 4
            with m.If((count >= 4) & (pos < self.max_payload)):
                with m.If(held):
                    m.d.sync += unkept.eq(1)
                with m.Else():
                    m.d.comb += [wr.addr.eq(pos >> 2), wr.data.eq(byte.replicate(4)), wr.en.eq(1 << pos[:2])]
        return m


class LinkFramer(wiring.Component):
    """Send one frame as bytes on ``o`` (to the UART): exactly ``sw.link.frame.encode``'s bytes.

    While idle (``busy`` low), ``start`` with ``frame_type``, ``frame_seq`` and ``frame_len`` (bytes, at
    most ``max_payload``) begins a frame; its payload is read as 32-bit little-endian words through
    ``rd_addr``/``rd_data`` (one cycle of latency: a memory read port, such as the retransmit buffer's).
    Up to four cycles a byte — the UART needs ten bit times — and ``o`` honours backpressure.
    """

    def __init__(self, max_payload=256):
        self.max_payload = max_payload
        super().__init__({
            "start": In(1), "frame_type": In(8), "frame_seq": In(8), "frame_len": In(16),
            "busy": Out(1),
            "rd_addr": Out(range(max(2, max_payload // 4))), "rd_data": In(32),
            "o": Out(stream.Signature(8)),
        })

    def elaborate(self, platform):
        m = Module()
        kind, seq, length = Signal(8), Signal(8), Signal(16)
        crc = Signal(32)
        k = Signal(range(self.max_payload + 9))          # the unstuffed byte being sent
        raw, held = Signal(8), Signal(8)                  # the byte picked; the byte being sent
        pos = Signal(16)
        m.d.comb += pos.eq(k - 4)
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [kind.eq(self.frame_type), seq.eq(self.frame_seq), length.eq(self.frame_len),
                                 crc.eq(0xFFFFFFFF), k.eq(0)]
                    m.next = "OPEN"
            with m.State("OPEN"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(0x7E)]
                with m.If(self.o.ready):
                    m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += self.rd_addr.eq(pos >> 2)     # the word arrives next cycle
                m.next = "PICK"
            with m.State("PICK"):
                header = [kind, seq, length[:8], length[8:]]
                with m.If(k < 4):
                    with m.Switch(k):
                        for n, b in enumerate(header):
                            with m.Case(n):
                                m.d.comb += raw.eq(b)
                with m.Elif(pos < length):
                    m.d.comb += raw.eq(self.rd_data.word_select(pos[:2], 8))
                with m.Else():
                    m.d.comb += raw.eq((~crc).word_select((pos - length)[:2], 8))
                with m.If((k < 4) | (pos < length)):
                    m.d.sync += crc.eq(crc32_byte_logic(crc, raw))
                m.d.sync += held.eq(raw)
                m.next = "SEND"
            with m.State("SEND"):
                special = (held == 0x7E) | (held == 0x7D)
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(Mux(special, 0x7D, held))]
                with m.If(self.o.ready):
                    with m.If(special):
                        m.next = "ESCAPED"
                    with m.Else():
                        m.d.sync += k.eq(k + 1)
                        m.next = "STEP"
            with m.State("ESCAPED"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(held ^ 0x20)]
                with m.If(self.o.ready):
                    m.d.sync += k.eq(k + 1)
                    m.next = "STEP"
            with m.State("STEP"):
                with m.If(k == length + 8):
                    m.next = "CLOSE"
                with m.Else():
                    m.next = "FETCH"
            with m.State("CLOSE"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(0x7E)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
