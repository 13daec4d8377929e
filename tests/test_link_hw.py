"""The link's device end in hardware, in Amaranth's simulator, against the host's own protocol code."""

import random

import pytest
from amaranth import Module, Signal
from hypothesis import given, settings, strategies as st
from amaranth.sim import Simulator

from ambert.boards.virtual import damage
from ambert.hw.link import LinkDeframer, crc32_byte_logic
from ambert.proto.link import CRC32, CRC32_RESIDUE, FrameType, crc32, crc32_byte
from ambert.sw.link.frame import Decoder, Frame, encode
from conftest import fuzz_examples


def test_crc32_register_and_fast_path_equal_the_catalog_model():
    """The byte register the board runs, and zlib's CRC the host runs, both == amaranth.lib.crc's model
    of CRC-32/ISO-HDLC; the register ends on the residue after data and its own CRC."""
    assert CRC32.compute(b"123456789") == 0xCBF43926          # the catalog's check value
    rng = random.Random(0)
    algorithm = CRC32.algorithm
    for n in (0, 1, 7, 100):
        data = bytes(rng.randrange(256) for _ in range(n))
        reg = algorithm.initial_crc
        for b in data:
            reg = crc32_byte(reg, b)
        assert reg ^ algorithm.xor_output == CRC32.compute(data) == crc32(data)
        for b in crc32(data).to_bytes(4, "little"):
            reg = crc32_byte(reg, b)
        assert reg == CRC32_RESIDUE


def test_crc32_logic_equals_the_model():
    m = Module()
    crc, byte, out = Signal(32), Signal(8), Signal(32)
    m.d.comb += out.eq(crc32_byte_logic(crc, byte))
    rng = random.Random(1)
    cases = [(rng.getrandbits(32), rng.getrandbits(8)) for _ in range(200)] + [(0, 0), (0xFFFFFFFF, 0xFF)]

    async def bench(ctx):
        for c, b in cases:
            ctx.set(crc, c)
            ctx.set(byte, b)
            assert ctx.get(out) == crc32_byte(c, b)
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


def _frames(rng, n):
    out = []
    for _ in range(n):
        kind = rng.choice(list(FrameType))
        size = 0 if kind == FrameType.ACK else rng.choice([0, 4, 8, 20, 64, 256])
        out.append(Frame(kind, rng.randrange(256), bytes(rng.choice([0x7E, 0x7D, rng.randrange(256)])
                                                         for _ in range(size))))
    return out


def _deframe(wire, gap, hold=0):
    """Feed ``wire`` one byte every ``gap`` cycles; read each good frame's payload, release it after
    ``hold`` more cycles. Returns (frames, bad, busy)."""
    dut = LinkDeframer(256)
    got = []

    async def bench(ctx):
        pos, wait, reading, words = 0, 0, None, []
        for cycle in range(len(wire) * gap + 400):
            feed = cycle % gap == 0 and pos < len(wire)
            ctx.set(dut.i.valid, feed)
            ctx.set(dut.i.payload, wire[pos] if feed else 0)
            pos += feed
            ctx.set(dut.frame_done, 0)
            if ctx.get(dut.ctl_valid):          # frames without payload are announced, never held
                got.append(Frame(FrameType(ctx.get(dut.ctl_type)), ctx.get(dut.ctl_seq), b""))
            if reading is None and ctx.get(dut.frame_valid):
                reading = (ctx.get(dut.frame_type), ctx.get(dut.frame_seq), ctx.get(dut.frame_len))
                words = []
            if reading is not None:
                n_words = -(-reading[2] // 4)
                if len(words) < n_words:
                    ctx.set(dut.rd_addr, len(words))
                    await ctx.tick()
                    words.append(ctx.get(dut.rd_data))
                    if ctx.get(dut.ctl_valid):
                        got.append(Frame(FrameType(ctx.get(dut.ctl_type)), ctx.get(dut.ctl_seq), b""))
                    continue
                if wait < hold:
                    wait += 1
                else:
                    payload = b"".join(w.to_bytes(4, "little") for w in words)[:reading[2]]
                    got.append(Frame(FrameType(reading[0]), reading[1], payload))
                    ctx.set(dut.frame_done, 1)
                    reading, wait = None, 0
            await ctx.tick()
        got.append((ctx.get(dut.bad_frames), ctx.get(dut.busy_drops)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got[:-1], got[-1][0], got[-1][1]


@pytest.mark.parametrize("seed, damaged", [(0, False), (1, True), (2, True)])
def test_deframer_accepts_exactly_what_the_host_decoder_accepts(seed, damaged):
    rng = random.Random(seed)
    frames = _frames(rng, 10)
    wire = b"noise\x7d" + b"".join(encode(f) for f in frames)
    if damaged:
        wire = damage(wire, rng, flip=4e-3, drop=2e-3, dup=2e-3)
    want = Decoder(max_payload=256).feed(wire)
    got, bad, busy = _deframe(wire, gap=16)     # slow enough that reading a frame never holds up the next
    assert got == want and busy == 0
    if damaged:
        assert 0 < len(want) < len(frames)      # the damage cost frames, and some still came through
    else:
        assert want == frames


@settings(max_examples=fuzz_examples(25))
@given(st.binary(max_size=120), st.randoms(use_true_random=False))
def test_fuzz_random_bytes_into_the_deframer(noise, rng):
    """Random bytes, then good frames: the board's deframer accepts exactly the frames the host's decoder
    accepts from the same bytes — none from the noise that the host would refuse, every good one after."""
    wire = noise + b"".join(encode(f) for f in _frames(rng, 2))
    want = Decoder(max_payload=256).feed(wire)
    got, bad, busy = _deframe(wire, gap=16)
    assert got == want and busy == 0


def test_frames_arriving_while_one_is_held_are_dropped_whole_but_acks_get_through():
    rng = random.Random(3)
    frames = [Frame(FrameType.DATA, i, bytes(rng.randrange(256) for _ in range(32))) for i in range(6)]
    acks = [Frame(FrameType.ACK, 100 + i) for i in range(6)]
    wire = b"".join(encode(f) + encode(a) for f, a in zip(frames, acks))
    got, bad, busy = _deframe(wire, gap=1, hold=100)       # the consumer sits on each frame a while
    assert busy > 0 and bad == 0
    data = [f for f in got if f.type == FrameType.DATA]
    assert data and all(f in frames for f in data)         # whatever got through is intact
    assert len(data) + busy == len(frames)
    assert [f for f in got if f.type == FrameType.ACK] == acks


@pytest.mark.parametrize("stall", [False, True])
def test_framer_sends_exactly_the_hosts_encoding(stall):
    from ambert.hw.link import LinkFramer
    rng = random.Random(7 + stall)
    frames = _frames(rng, 8) + [Frame(FrameType.DATA, 0x7E, b"\x7e\x7d" * 2), Frame(FrameType.ACK, 0x7D)]
    dut = LinkFramer(256)
    out = []

    async def bench(ctx):
        for f in frames:
            words = [int.from_bytes(f.payload[i:i + 4].ljust(4, b"\0"), "little")
                     for i in range(0, len(f.payload), 4)]
            ctx.set(dut.frame_type, int(f.type))
            ctx.set(dut.frame_seq, f.seq)
            ctx.set(dut.frame_len, len(f.payload))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            sent = bytearray()
            while ctx.get(dut.busy):
                ready = not stall or rng.random() < 0.4
                ctx.set(dut.o.ready, ready)
                addr = ctx.get(dut.rd_addr)
                if ready and ctx.get(dut.o.valid):
                    sent.append(ctx.get(dut.o.payload))
                await ctx.tick()
                ctx.set(dut.rd_data, words[addr] if addr < len(words) else 0)   # one cycle of latency
            out.append(bytes(sent))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert out == [encode(f) for f in frames]


# --- the go-back-N endpoint against the host's Endpoint ------------------------------------------------


class _SimWire:
    """The host side of a simulated UART: bytes the host writes wait to be fed to the device one per
    ``gap`` cycles; bytes the device sends wait for the host's next read. Both ways may be damaged."""

    def __init__(self, rng, flip=0.0, drop=0.0, dup=0.0):
        self.rng, self.flip, self.drop, self.dup = rng, flip, drop, dup
        self.to_device, self.to_host = bytearray(), bytearray()

    def _damage(self, data):
        return damage(data, self.rng, self.flip, self.drop, self.dup) if self.flip + self.drop + self.dup else data

    def write(self, data):
        self.to_device += self._damage(data)

    def read(self, timeout):
        data, self.to_host = self._damage(bytes(self.to_host)), bytearray()
        return data


def _endpoint_session(words, gap=2, faults=(0.0, 0.0, 0.0), seed=0, hello=bytes(range(16)), stall=0.0,
                      max_cycles=400_000, reset_at=None):
    """Run the host Endpoint against LinkEndpoint; the accelerator is a stub answering each word w with
    3w + 1 (sometimes slow to take or give). Returns (host endpoint, answers, device counters)."""
    from ambert.hw.link import LinkEndpoint
    from ambert.sw.link.arq import Endpoint
    rng = random.Random(seed)
    dut = LinkEndpoint(hello, max_payload=64, window=4, retry_cycles=3000)
    wire = _SimWire(rng, *faults)
    now = [0]
    hellos = []
    host = Endpoint(wire, window=4, max_payload=64, retry_s=0.004, max_retries=50, clock=lambda: now[0] * 1e-6,
                    on_hello=hellos.append)
    host.send_frame(Frame(FrameType.HELLO, 0))
    result = {}

    async def bench(ctx):
        echo = []
        queued = False
        for cycle in range(max_cycles):
            now[0] = cycle
            feed = cycle % gap == 0 and wire.to_device
            ctx.set(dut.rx.valid, bool(feed))
            ctx.set(dut.rx.payload, wire.to_device.pop(0) if feed else 0)
            ctx.set(dut.tx.ready, cycle % gap == 0)
            if cycle % gap == 0 and ctx.get(dut.tx.valid):
                wire.to_host.append(ctx.get(dut.tx.payload))
            take = rng.random() >= stall
            ctx.set(dut.o.ready, take)
            if take and ctx.get(dut.o.valid):
                echo.append((3 * ctx.get(dut.o.payload) + 1) & 0xFFFFFFFF)
            if ctx.get(dut.accel_reset):
                echo.clear()
            give = bool(echo) and rng.random() >= stall
            ctx.set(dut.i.valid, give)
            ctx.set(dut.i.payload, echo[0] if give else 0)
            if give and ctx.get(dut.i.ready):
                echo.pop(0)
            if cycle % 16 == 0:
                host.poll(0)
                if not hellos and cycle % 4992 == 4976:
                    host.send_frame(Frame(FrameType.HELLO, 0))      # as BoardLink.handshake retries
                if hellos and not queued:
                    host.reset()
                    host.queue(b"".join(w.to_bytes(4, "little") for w in words))
                    queued = True
                if reset_at is not None and cycle == reset_at:
                    result["answered_before_reset"] = len(host.received) // 4
                    host.reset()                      # the host restarts the link mid-transfer
                    host.received.clear()
                    hellos.clear()
                    queued = False
                    host.send_frame(Frame(FrameType.HELLO, 0))
                if queued and host.idle and len(host.received) >= 4 * len(words) and not ctx.get(dut.active):
                    break
            await ctx.tick()
        result.update(cycles=cycle, retransmits=ctx.get(dut.retransmits), bad=ctx.get(dut.bad_frames),
                      busy=ctx.get(dut.busy_drops))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    got = [int.from_bytes(host.received[k:k + 4], "little") for k in range(0, len(host.received), 4)]
    return host, hellos, got, result


@pytest.mark.parametrize("faults, stall", [((0.0, 0.0, 0.0), 0.0), ((0.0, 0.0, 0.0), 0.7),
                                           ((2e-3, 2e-3, 2e-3), 0.3)], ids=["clean", "slow-device", "damaged"])
def test_endpoint_delivers_in_order_both_ways(faults, stall):
    words = [random.Random(k).getrandbits(32) for k in range(200)]
    host, hellos, got, res = _endpoint_session(words, faults=faults, stall=stall, seed=len(faults) + int(10 * stall))
    # the power-on announcement and the answer to the host's HELLO (when the line spared them)
    assert 1 <= len(hellos) <= 2 and all(h.payload == bytes(range(16)) for h in hellos)
    assert got == [(3 * w + 1) & 0xFFFFFFFF for w in words], res
    if faults[0]:
        assert res["bad"] > 0 and (res["retransmits"] > 0 or host.retransmitted > 0)
    else:
        assert res["bad"] == 0 and res["retransmits"] == 0


def test_a_hello_mid_transfer_restarts_the_link_and_the_accelerator():
    words = [random.Random(k).getrandbits(32) for k in range(200)]
    host, hellos, got, res = _endpoint_session(words, reset_at=2000)
    assert 0 < res["answered_before_reset"] < len(words)      # the restart came mid-transfer
    assert len(hellos) == 1                 # the answer to the second HELLO
    assert got == [(3 * w + 1) & 0xFFFFFFFF for w in words], res


def test_acks_outside_the_window_are_ignored_and_one_mid_round_trims_the_resend():
    """Crafted ACKs no host sends: one ahead of every frame sent and one behind the window change nothing
    (the next timeout resends all three outstanding frames); an ACK of the first two arriving while the
    next round resends frame 0 skips frame 1; after the last ACK nothing is sent again."""
    from ambert.hw.link import LinkEndpoint
    retry = 2000
    dut = LinkEndpoint(bytes(range(16)), max_payload=64, window=4, retry_cycles=retry)

    async def bench(ctx):
        decoder, to_device, words, sent = Decoder(max_payload=64), [], [0x11, 0x22, 0x33], []

        async def run(cycles, until=None):
            for cycle in range(cycles):
                feed = cycle % 2 == 0 and bool(to_device)
                ctx.set(dut.rx.valid, feed)
                ctx.set(dut.rx.payload, to_device.pop(0) if feed else 0)
                ctx.set(dut.tx.ready, 1)
                if ctx.get(dut.tx.valid):
                    sent.extend(f for f in decoder.feed(bytes([ctx.get(dut.tx.payload)]))
                                if f.type == FrameType.DATA)
                # one answer word at a time, each once the frame before it is out: three frames
                give = bool(words) and len(sent) == 3 - len(words)
                ctx.set(dut.i.valid, give)
                ctx.set(dut.i.payload, words[0] if give else 0)
                if give and ctx.get(dut.i.ready):
                    words.pop(0)
                await ctx.tick()
                if until is not None and until():
                    return
            assert until is None, "timed out"

        def ack(seq):
            to_device.extend(encode(Frame(FrameType.ACK, seq)))

        round_starts = lambda n: lambda: ctx.get(dut.retransmits) == n      # noqa: E731
        await run(retry, until=lambda: len(sent) == 3)                     # frames 0, 1, 2, one word each
        assert [f.seq for f in sent] == [0, 1, 2] and ctx.get(dut.retransmits) == 0
        ack(7)                                      # ahead of everything sent
        ack(255)                                    # behind the window
        await run(2 * retry, until=round_starts(1))
        await run(retry // 2, until=lambda: len(sent) == 6)
        assert [f.seq for f in sent[3:]] == [0, 1, 2] and [f.payload for f in sent[3:]] == [f.payload for f in sent[:3]]
        await run(2 * retry, until=round_starts(2))
        ack(2)                                      # lands while frame 0 goes out again: frame 1 is skipped
        await run(retry // 2, until=lambda: len(sent) == 8)
        assert [f.seq for f in sent[6:]] == [0, 2]
        await run(2 * retry, until=round_starts(3))
        ack(3)
        await run(3 * retry, until=lambda: not ctx.get(dut.active))
        await run(2 * retry)                        # nothing outstanding: no timeout, nothing sent
        assert [f.seq for f in sent[8:]] == [2]
        assert ctx.get(dut.retransmits) == 3 and not ctx.get(dut.active)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
