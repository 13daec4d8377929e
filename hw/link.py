"""The device end of the host link, in hardware (docs/link.md): CRC-32, the deframer, the framer, and the
go-back-N endpoint that puts them in front of the accelerator's streams.

Every constant is the protocol's (:mod:`ambert.proto.link`). The golden model is the host's own codec:
:class:`ambert.sw.link.frame.Decoder` decides which frames are good, and the tests compare the deframer
against it byte stream for byte stream.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ambert.proto.link import CRC32, CRC32_RESIDUE, ESC, ESC_XOR, FLAG, FrameType, crc32_byte

__all__ = ["crc32_byte_logic", "LinkDeframer", "LinkFramer", "LinkEndpoint"]

_CRC_INIT = CRC32.algorithm.initial_crc


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
    rules of :class:`ambert.sw.link.frame.Decoder`. A good frame raises ``frame_valid`` with ``frame_type``,
    ``frame_seq`` and ``frame_len`` and holds them, with the payload readable at ``rd_addr``/``rd_data``
    (one cycle of latency), until ``frame_done``. Frames that end while one is held are dropped and
    counted in ``busy_drops`` (the host resends them); bad ones count in ``bad_frames``. ``i`` is
    always ready: the UART cannot wait.

    A good frame without payload (an ACK, a HELLO from the host) needs no buffer: it is never held and
    never dropped for being busy, but announced for one cycle on ``ctl_valid`` with ``ctl_type`` and
    ``ctl_seq`` — so acknowledgements get through while a DATA frame waits on a stalled accelerator.
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
            "ctl_valid": Out(1), "ctl_type": Out(8), "ctl_seq": Out(8),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = memory.Memory(shape=32, depth=self.words, init=[])
        wr, rd = buf.write_port(granularity=8), buf.read_port()
        m.d.comb += [rd.addr.eq(self.rd_addr), self.rd_data.eq(rd.data), self.i.ready.eq(1)]

        crc = Signal(32, init=_CRC_INIT)
        count = Signal(range(self.max_payload + 16))     # unstuffed bytes of this frame so far
        escaped, broken = Signal(), Signal()              # last byte was ESC; the frame is spoilt
        unkept = Signal()                                 # some payload arrived while a frame was held
        hdr = [Signal(8, name=f"hdr{n}") for n in range(4)]
        length = Signal(16)
        m.d.comb += length.eq(hdr[2] | (hdr[3] << 8))
        byte = Signal(8)
        have = Signal()
        # (the byte, and the buffer's write address and data, whatever the conditions: only ``have`` and
        # the write enable depend on them, so the buffer's inputs carry no decision logic)
        m.d.comb += byte.eq(Mux(escaped, self.i.payload ^ ESC_XOR, self.i.payload))

        # what the header says, registered a cycle after its bytes (a frame's four CRC bytes come between
        # them and its end), so the end's decision takes flags, not compares
        known, fits, frame_end = Signal(), Signal(), Signal.like(count)
        m.d.sync += [known.eq((hdr[0] >= min(FrameType)) & (hdr[0] <= max(FrameType))),
                     fits.eq(length <= self.max_payload), frame_end.eq(length + 8)]

        with m.If(self.frame_valid & self.frame_done):
            m.d.sync += self.frame_valid.eq(0)
        m.d.sync += self.ctl_valid.eq(0)

        def restart():
            m.d.sync += [crc.eq(_CRC_INIT), count.eq(0), escaped.eq(0), broken.eq(0), unkept.eq(0)]

        with m.If(self.i.valid):
            with m.If(self.i.payload == FLAG):
                # a FLAG ends a frame (if any bytes came) and starts the next
                good = (~broken & ~escaped & (crc == CRC32_RESIDUE) & (count == frame_end) & fits & known)
                with m.If(count != 0):
                    with m.If(~good):
                        m.d.sync += self.bad_frames.eq(self.bad_frames + 1)
                    with m.Elif(length == 0):
                        m.d.sync += [self.ctl_valid.eq(1), self.ctl_type.eq(hdr[0]), self.ctl_seq.eq(hdr[1])]
                    with m.Elif(unkept | (self.frame_valid & ~self.frame_done)):
                        m.d.sync += self.busy_drops.eq(self.busy_drops + 1)
                    with m.Else():
                        m.d.sync += self.frame_valid.eq(1)
                    # the header's fields taken at any frame's end while none is held, good or not (only
                    # `frame_valid` says whether they are a frame's), so the CRC's compare stays off their
                    # enables
                    with m.If(~unkept & ~(self.frame_valid & ~self.frame_done)):
                        m.d.sync += [self.frame_type.eq(hdr[0]), self.frame_seq.eq(hdr[1]),
                                     self.frame_len.eq(length)]
                restart()
            with m.Elif(escaped):
                m.d.sync += escaped.eq(0)
                with m.If((self.i.payload == FLAG ^ ESC_XOR) | (self.i.payload == ESC ^ ESC_XOR)):
                    m.d.comb += have.eq(1)
                with m.Else():
                    m.d.sync += broken.eq(1)
            with m.Elif(self.i.payload == ESC):
                m.d.sync += escaped.eq(1)
            with m.Else():
                m.d.comb += have.eq(1)

        held = self.frame_valid & ~self.frame_done
        pos = count - 4
        m.d.comb += [wr.addr.eq(pos >> 2), wr.data.eq(byte.replicate(4))]
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
            with m.If((count >= 4) & (pos < self.max_payload)):
                with m.If(held):
                    m.d.sync += unkept.eq(1)
                with m.Else():
                    m.d.comb += wr.en.eq(1 << pos[:2])
        return m


class LinkFramer(wiring.Component):
    """Send one frame as bytes on ``o`` (to the UART): exactly ``ambert.sw.link.frame.encode``'s bytes.

    While idle (``busy`` low), ``start`` with ``frame_type``, ``frame_seq`` and ``frame_len`` (bytes, at
    most ``max_payload``) begins a frame; its payload is read as 32-bit little-endian words through
    ``rd_addr``/``rd_data`` (one cycle of latency: a memory read port, such as the retransmit buffer's).
    Up to five cycles a byte — the UART needs ten bit times — and ``o`` honours backpressure.
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
        kind, seq, length = Signal(8), Signal(8), Signal(range(self.max_payload + 1))
        crc = Signal(32)
        k = Signal(range(self.max_payload + 9))          # the unstuffed byte being sent
        word = Signal(32)                                 # the payload word read
        raw, held = Signal(8), Signal(8)                  # the byte picked; the byte being sent
        summed = Signal()                                 # ... and whether it goes into the CRC
        pos = Signal(len(k))
        m.d.comb += pos.eq(k - 4)
        # which byte the next one is, decided a cycle before it is picked, so k's compares and
        # subtraction do not share a cycle with the byte multiplexer: a header byte, a payload byte or a
        # CRC byte, and which of the four
        in_header, in_payload, byte_sel = Signal(), Signal(), Signal(2)
        special = Signal()                                # `held` is a flag or escape byte
        # the CRC takes the byte sent in STEP, on a flag of its own, not the FSM's state decoded with
        # `summed`, as the enable of its 32 flip-flops
        add_crc = Signal()
        m.d.sync += add_crc.eq(0)
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [kind.eq(self.frame_type), seq.eq(self.frame_seq), length.eq(self.frame_len),
                                 crc.eq(_CRC_INIT), k.eq(0)]
                    m.next = "OPEN"
            with m.State("OPEN"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(FLAG)]
                with m.If(self.o.ready):
                    m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += self.rd_addr.eq(pos >> 2)     # the word arrives next cycle
                m.next = "LATCH"
            with m.State("LATCH"):
                # the word registered before a byte is picked from it, so the retransmit buffer's block
                # RAM output ends at a flip-flop
                m.d.sync += [word.eq(self.rd_data), in_header.eq(k < 4), in_payload.eq(pos < length),
                             byte_sel.eq(Mux(k < 4, k[:2], Mux(pos < length, pos[:2], (pos - length)[:2])))]
                m.next = "PICK"
            with m.State("PICK"):
                header = Cat(kind, seq, length.as_unsigned()[:8], Cat(length, Const(0, 16))[8:16])
                with m.If(in_header):
                    m.d.comb += raw.eq(header.word_select(byte_sel, 8))
                with m.Elif(in_payload):
                    m.d.comb += raw.eq(word.word_select(byte_sel, 8))
                with m.Else():
                    m.d.comb += raw.eq((~crc).word_select(byte_sel, 8))
                # the CRC takes the byte a cycle later (in STEP), not through the byte's multiplexer; whether
                # it must be escaped is decided here too, so no compare of `held` runs on into `k`'s
                # enables
                m.d.sync += [held.eq(raw), summed.eq(in_header | in_payload),
                             special.eq((raw == FLAG) | (raw == ESC))]
                m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(Mux(special, ESC, held))]
                with m.If(self.o.ready):
                    with m.If(special):
                        m.next = "ESCAPED"
                    with m.Else():
                        m.d.sync += [k.eq(k + 1), add_crc.eq(summed)]
                        m.next = "STEP"
            with m.State("ESCAPED"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(held ^ ESC_XOR)]
                with m.If(self.o.ready):
                    m.d.sync += [k.eq(k + 1), add_crc.eq(summed)]
                    m.next = "STEP"
            with m.State("STEP"):
                with m.If(k == length + 8):
                    m.next = "CLOSE"
                with m.Else():
                    m.next = "FETCH"
            with m.State("CLOSE"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(FLAG)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
        with m.If(add_crc):                               # (high in STEP only)
            m.d.sync += crc.eq(crc32_byte_logic(crc, held))
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


# the frame types are the host's (the hardware carries the same numbers)
_HELLO, _DATA, _ACK = FrameType.HELLO, FrameType.DATA, FrameType.ACK


class LinkEndpoint(wiring.Component):
    """The board's end of the link: go-back-N (docs/link.md) between the UART's bytes and the accelerator.

    ``rx``/``tx``: bytes from and to the UART. ``o``: the in-order payload of the host's DATA frames, as
    32-bit words, to the accelerator; ``i``: the accelerator's answer words, sent back as DATA frames.

    Receiving: a DATA frame with the expected sequence number is handed over word by word, then
    acknowledged (so an ACK means the accelerator took the words); any other DATA frame is acknowledged
    with the number still expected and dropped. A HELLO resets the link, pulses ``accel_reset`` for one
    cycle and is answered with ``hello`` (the 16-byte description), which is also sent once after reset:
    a board that restarts says so. ACKs move the send window on.

    Sending: answer words fill the buffer slot of the next sequence number (``window`` slots of
    ``max_payload`` bytes: the retransmit buffer). A slot goes out as a frame whenever the framer is free,
    so frames grow while the line is busy and nothing waits for a timeout; ``i`` stalls while ``window``
    frames are unacknowledged. When the oldest has waited ``retry_cycles`` every unacknowledged frame is
    sent again. The framer sends, in order of priority: the HELLO answer, an ACK, a retransmission, a new
    frame. ``active`` is high while anything is left to do; ``retransmits`` counts go-back-N rounds.
    """

    def __init__(self, hello, max_payload=256, window=4, retry_cycles=1_000_000):
        if len(hello) % 4 or len(hello) > max_payload:
            raise ValueError(f"the HELLO description must be whole words, not {len(hello)} bytes")
        for name, v in (("max_payload", max_payload), ("window", window)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, not {v}")
        if not 4 <= max_payload <= 1024 or not 1 <= window <= 64:
            raise ValueError(f"max_payload must be in [4, 1024] and window in [1, 64], "
                             f"not {max_payload} and {window}")
        self.hello, self.max_payload, self.window = bytes(hello), max_payload, window
        self.words = max_payload // 4
        self.retry_cycles = retry_cycles
        super().__init__({
            "rx": In(stream.Signature(8)), "tx": Out(stream.Signature(8)),
            "o": Out(stream.Signature(32)), "i": In(stream.Signature(32)),
            "accel_reset": Out(1), "active": Out(1),
            "retransmits": Out(16), "bad_frames": Out(16), "busy_drops": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        W, N = self.window, self.words
        m.submodules.deframer = dfr = LinkDeframer(self.max_payload)
        m.submodules.framer = fr = LinkFramer(self.max_payload)
        wiring.connect(m, wiring.flipped(self.rx), dfr.i)
        wiring.connect(m, fr.o, wiring.flipped(self.tx))
        m.d.comb += [self.bad_frames.eq(dfr.bad_frames), self.busy_drops.eq(dfr.busy_drops)]

        # --- state ---
        rx_expected = Signal(8)
        tx_base, tx_next = Signal(8), Signal(8)         # oldest unacknowledged; the one being filled
        # distances inside the window (at most W) are exact in the low bits of the sequence numbers'
        # difference: narrow subtractors keep the ACK bookkeeping off the critical path
        win_bits = W.bit_length()
        outstanding = Signal(win_bits)
        m.d.comb += outstanding.eq(tx_next - tx_base)
        fill = Signal(range(N + 1))                     # words in slot tx_next
        slot_len = Array(Signal(range(self.max_payload + 1), name=f"slot_len{k}") for k in range(W))
        resending, resend_ptr = Signal(), Signal(8)
        ack_pending = Signal()
        hello_pending = Signal(init=1)                  # a board announces itself after a reset
        timer = Signal(range(self.retry_cycles + 1))
        slot_bits = (W - 1).bit_length()

        def slot(seq):
            return seq[:slot_bits] if slot_bits else Const(0, 1)

        m.submodules.txbuf = txbuf = memory.Memory(shape=32, depth=W * N, init=[])
        tb_wr, tb_rd = txbuf.write_port(), txbuf.read_port()

        # --- answers from the accelerator into the slot being filled ---
        # A word is taken into a register first and written to the slot from there: ``i.ready`` is then a
        # flip-flop, not the window arithmetic below, which then stays off the accelerator's paths. A word
        # every other cycle is still far above the UART's rate.
        launch = Signal()                               # the framer starts this cycle
        closing = Signal()                              # ... with the slot being filled
        held, held_word = Signal(), Signal(32)
        m.d.comb += self.i.ready.eq(~held)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(1), held_word.eq(self.i.payload)]
        m.d.comb += [tb_wr.addr.eq(Cat(fill[:(N - 1).bit_length()], slot(tx_next)) if N > 1 else slot(tx_next)),
                     tb_wr.data.eq(held_word)]
        with m.If(held & (outstanding < W) & (fill < N) & ~closing):
            m.d.comb += tb_wr.en.eq(1)
            m.d.sync += [fill.eq(fill + 1), held.eq(0)]

        # --- the framer: what goes out next ---
        started = Signal()                              # the framer raises busy the cycle after a start
        m.d.sync += started.eq(launch)
        send_hello, send_slot = Signal(), Signal(max(1, slot_bits))
        m.d.comb += tb_rd.addr.eq(Cat(fr.rd_addr[:(N - 1).bit_length()], send_slot) if N > 1 else send_slot)
        hello_words = [int.from_bytes(self.hello[k:k + 4], "little") for k in range(0, len(self.hello), 4)]
        hello_rom = Array(Const(w, 32) for w in hello_words)
        hello_word = Signal(32)
        m.d.sync += hello_word.eq(hello_rom[fr.rd_addr[:max(1, (len(hello_words) - 1).bit_length())]])
        m.d.comb += fr.rd_data.eq(Mux(send_hello, hello_word, tb_rd.data))
        with m.If(~fr.busy & ~started):
            with m.If(hello_pending):
                m.d.comb += [launch.eq(1), fr.frame_type.eq(_HELLO), fr.frame_seq.eq(0),
                             fr.frame_len.eq(len(self.hello))]
                m.d.sync += [hello_pending.eq(0), send_hello.eq(1)]
            with m.Elif(ack_pending):
                m.d.comb += [launch.eq(1), fr.frame_type.eq(_ACK), fr.frame_seq.eq(rx_expected)]
                m.d.sync += ack_pending.eq(0)
            with m.Elif(resending):
                m.d.comb += [launch.eq(1), fr.frame_type.eq(_DATA), fr.frame_seq.eq(resend_ptr),
                             fr.frame_len.eq(slot_len[slot(resend_ptr)])]
                m.d.sync += [send_hello.eq(0), send_slot.eq(slot(resend_ptr)), resend_ptr.eq(resend_ptr + 1)]
                left = Signal(win_bits)                 # frames still to resend, this one included
                m.d.comb += left.eq(tx_next - resend_ptr)
                with m.If(left == 1):
                    m.d.sync += resending.eq(0)
            with m.Elif((fill != 0) & (outstanding < W)):
                m.d.comb += [launch.eq(1), closing.eq(1), fr.frame_type.eq(_DATA), fr.frame_seq.eq(tx_next),
                             fr.frame_len.eq(fill << 2)]
                m.d.sync += [send_hello.eq(0), send_slot.eq(slot(tx_next)), slot_len[slot(tx_next)].eq(fill << 2),
                             tx_next.eq(tx_next + 1), fill.eq(0)]
        m.d.comb += fr.start.eq(launch)

        # --- acknowledgements (they arrive as control frames, even while a DATA frame is held) ---
        # An ACK is decided the cycle the deframer announces it and acted on the next: the window's state
        # cannot move in between in a way that changes the decision (control frames are a frame's bytes
        # apart, and tx_next and resend_ptr only step forward inside the window).
        ctl = dfr.ctl_valid
        ack, ack_seq, skip_resent = Signal(), Signal(8), Signal()
        distance, resent = Signal(8), Signal(win_bits)
        m.d.comb += [distance.eq(dfr.ctl_seq - tx_base), resent.eq(resend_ptr - tx_base)]
        m.d.sync += [ack.eq(ctl & (dfr.ctl_type == _ACK) & (distance != 0) & (distance <= outstanding)),
                     ack_seq.eq(dfr.ctl_seq),
                     skip_resent.eq(resent < distance[:win_bits])]
        with m.If(ack):
            m.d.sync += [tx_base.eq(ack_seq), timer.eq(0)]
            # a retransmission round in progress skips what is now acknowledged
            with m.If(skip_resent):
                m.d.sync += resend_ptr.eq(ack_seq)
                with m.If(ack_seq == tx_next):
                    m.d.sync += resending.eq(0)

        # --- the retransmission timer: runs while frames are unacknowledged ---
        with m.If(outstanding == 0):
            m.d.sync += timer.eq(0)
        with m.Elif(ctl | ack):
            pass                # an ACK being taken restarts it: no round may begin under the ACK's decision
        with m.Elif(timer == self.retry_cycles):
            m.d.sync += [timer.eq(0), resending.eq(1), resend_ptr.eq(tx_base),
                         self.retransmits.eq(self.retransmits + 1)]
        with m.Else():
            m.d.sync += timer.eq(timer + 1)

        # --- DATA frames to the accelerator, in order ---
        idx = Signal(range(N))
        n_words = Signal(range(N + 1))
        m.d.comb += n_words.eq(dfr.frame_len >> 2)
        last_word = Signal()                            # idx is the frame's last word (registered: the
                                                        # compare ran on into the deframer's enables)
        host_hello = ctl & (dfr.ctl_type == _HELLO)

        def void_on_hello():
            # a HELLO voids whatever the host sent before it (last in each state: it wins)
            with m.If(host_hello):
                m.d.comb += dfr.frame_done.eq(dfr.frame_valid)
                m.next = "IDLE"

        with m.FSM(name="rx") as rx_fsm:
            with m.State("IDLE"):
                with m.If(dfr.frame_valid):
                    with m.If((dfr.frame_type == _DATA) & (dfr.frame_seq == rx_expected)
                              & (dfr.frame_len[:2] == 0)):
                        m.d.sync += [idx.eq(0), last_word.eq(n_words == 1)]
                        m.next = "FETCH"
                    with m.Else():                       # out of order, or not a frame the host sends held
                        m.d.comb += dfr.frame_done.eq(1)
                        m.d.sync += ack_pending.eq(1)
                with m.Elif(ctl & (dfr.ctl_type == _DATA)):
                    # an empty DATA frame (no host sends one): in order it moves the count on
                    with m.If(dfr.ctl_seq == rx_expected):
                        m.d.sync += rx_expected.eq(rx_expected + 1)
                    m.d.sync += ack_pending.eq(1)
                void_on_hello()
            with m.State("FETCH"):
                m.d.comb += dfr.rd_addr.eq(idx)
                m.next = "PRESENT"
                void_on_hello()
            with m.State("PRESENT"):
                m.d.comb += [dfr.rd_addr.eq(idx), self.o.valid.eq(1), self.o.payload.eq(dfr.rd_data)]
                with m.If(self.o.ready):
                    with m.If(last_word):
                        m.d.comb += dfr.frame_done.eq(1)
                        m.d.sync += [rx_expected.eq(rx_expected + 1), ack_pending.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [idx.eq(idx + 1), last_word.eq(idx + 2 == n_words)]
                        m.next = "FETCH"
                void_on_hello()

        # --- a HELLO from the host restarts everything (last: it wins over all of the above) ---
        with m.If(host_hello):
            m.d.comb += self.accel_reset.eq(1)
            m.d.sync += [rx_expected.eq(0), tx_base.eq(0), tx_next.eq(0), fill.eq(0), resending.eq(0),
                         ack_pending.eq(0), hello_pending.eq(1), timer.eq(0), held.eq(0)]

        m.d.comb += self.active.eq(hello_pending | ack_pending | resending | held | (fill != 0) | (outstanding != 0)
                                   | fr.busy | started | dfr.frame_valid | ~rx_fsm.ongoing("IDLE"))
        return m
