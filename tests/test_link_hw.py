"""The link's device end in hardware, in Amaranth's simulator, against the host's own protocol code."""

import random
import zlib

import pytest
from amaranth.sim import Simulator

from boards.virtual import damage
from amaranth import Module, Signal

from hw.link import CRC32_RESIDUE, LinkDeframer, crc32_byte, crc32_byte_logic
from sw.link.frame import Decoder, Frame, FrameType, encode


def test_crc32_matches_zlib_and_leaves_the_residue():
    rng = random.Random(0)
    for n in (0, 1, 7, 100):
        data = bytes(rng.randrange(256) for _ in range(n))
        reg = 0xFFFFFFFF
        for b in data:
            reg = crc32_byte(reg, b)
        assert reg ^ 0xFFFFFFFF == zlib.crc32(data)
        for b in zlib.crc32(data).to_bytes(4, "little"):
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
            if reading is None and ctx.get(dut.frame_valid):
                reading = (ctx.get(dut.frame_type), ctx.get(dut.frame_seq), ctx.get(dut.frame_len))
                words, addr = [], 0
            if reading is not None:
                n_words = -(-reading[2] // 4)
                if len(words) < n_words:
                    ctx.set(dut.rd_addr, len(words))
                    await ctx.tick()
                    words.append(ctx.get(dut.rd_data))
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


def test_frames_arriving_while_one_is_held_are_dropped_whole():
    rng = random.Random(3)
    frames = [Frame(FrameType.DATA, i, bytes(rng.randrange(256) for _ in range(32))) for i in range(6)]
    wire = b"".join(encode(f) for f in frames)
    got, bad, busy = _deframe(wire, gap=1, hold=100)       # the consumer sits on each frame a while
    assert busy > 0 and bad == 0
    assert got and all(f in frames for f in got)           # whatever got through is intact
    assert len(got) + busy == len(frames)


@pytest.mark.parametrize("stall", [False, True])
def test_framer_sends_exactly_the_hosts_encoding(stall):
    from hw.link import LinkFramer
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
