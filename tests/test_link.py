"""The host link (docs/link.md): frames, go-back-N delivery under damage, and the board device against a
virtual board on a pseudo-terminal — results `==` the reference, or a clear error and a fallback."""

import dataclasses
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ambert.boards.virtual import damage
from ambert.proto.isa import Error, Mode, parse_status
from ambert.sw.compiler.gemm import gemm_program
from ambert.proto.link import FrameType
from ambert.sw.link import Endpoint, Frame, LinkError
from ambert.sw.link.frame import Decoder, encode
from ambert.sw.quant.hf import encode as encode_text
from ambert.sw.quant.ref import ref_matmul
from ambert.sw.runtime import DeviceError, OffloadedBert
from ambert.sw.runtime.board import BoardDevice
from ambert.sw.runtime.cpu import CpuDevice
from conftest import fuzz_examples

ROOT = Path(__file__).resolve().parent.parent


# --- frames ---------------------------------------------------------------------------------------------


def test_frames_round_trip_whatever_the_bytes():
    rng = random.Random(1)
    frames = [Frame(FrameType.DATA, rng.randrange(256), bytes([0x7E, 0x7D] * 8 + [rng.randrange(256)
                                                                                 for _ in range(240)]))
              for _ in range(20)] + [Frame(FrameType.ACK, 7), Frame(FrameType.HELLO, 0, b"\x7e\x7d\x5e")]
    wire = b"".join(encode(f) for f in frames)
    dec = Decoder()
    got = []
    for i in range(0, len(wire), 7):                 # arriving in odd pieces
        got += dec.feed(wire[i:i + 7])
    assert got == frames and dec.dropped == 0
    assert wire.count(b"\x7e") == 2 * len(frames)     # a FLAG only ever delimits


def test_decoder_drops_damage_and_resynchronises():
    good = Frame(FrameType.DATA, 3, bytes(range(64)))
    wire = encode(good)
    flipped = bytearray(wire)
    flipped[10] ^= 0x04
    cut = wire[:30]
    dec = Decoder()
    got = dec.feed(b"garbage \x7d\x7d noise" + bytes(flipped) + cut + wire + b"\x7e\x7e" + wire)
    assert got == [good, good]
    assert dec.dropped >= 2                         # the flipped frame; the cut one ran into a FLAG


class _Wire:
    """Two in-memory byte pipes between endpoints, damaging bytes like a bad cable (seeded)."""

    def __init__(self, seed, flip=0.0, drop=0.0, dup=0.0):
        self.rng = random.Random(seed)
        self.flip, self.drop, self.dup = flip, drop, dup
        self.queues = ([], [])

    def end(self, side):
        wire = self

        class End:
            def write(self, data):
                wire.queues[1 - side].extend(damage(data, wire.rng, wire.flip, wire.drop, wire.dup))

            def read(self, timeout):
                q = wire.queues[side]
                data = bytes(q)
                q.clear()
                return data
        return End()


@pytest.mark.parametrize("damage", [{}, {"flip": 2e-4, "drop": 2e-4, "dup": 2e-4}, {"drop": 3e-3}])
def test_go_back_n_delivers_everything_in_order(damage):
    wire = _Wire(7, **damage)
    a = Endpoint(wire.end(0), window=4, max_payload=64, retry_s=0.002, max_retries=1000)
    b = Endpoint(wire.end(1), window=4, max_payload=64, retry_s=0.002, max_retries=1000)
    rng = np.random.default_rng(0)
    to_b, to_a = rng.bytes(40_000), rng.bytes(12_000)
    a.queue(to_b)
    b.queue(to_a)
    deadline = time.monotonic() + 60
    while not (a.idle and b.idle and len(b.received) == len(to_b) and len(a.received) == len(to_a)):
        a.poll(0)
        b.poll(0)
        assert time.monotonic() < deadline, "link made no progress"
    assert bytes(b.received) == to_b and bytes(a.received) == to_a
    if damage:
        assert a.retransmitted > 0


def test_a_dead_peer_is_declared_after_the_retries():
    wire = _Wire(0)
    a = Endpoint(wire.end(0), retry_s=0.001, max_retries=5)
    a.queue(b"\0" * 16)
    with pytest.raises(LinkError, match="no acknowledgement after 5 retransmissions"):
        for _ in range(100_000):
            a.poll(0)


@settings(max_examples=fuzz_examples(300))
@given(st.binary(max_size=600), st.sampled_from(list(FrameType)), st.integers(0, 255),
       st.binary(max_size=64).map(lambda b: b[:len(b) // 4 * 4]))
def test_fuzz_random_bytes_never_break_the_decoder(noise, kind, seq, payload):
    """Any bytes at all: the decoder raises nothing, yields only frames that are well formed (each
    re-encodes to a frame that decodes to itself), and a good frame after the noise still arrives."""
    if kind == FrameType.ACK:
        payload = b""
    good = Frame(kind, seq, payload)
    decoder = Decoder(max_payload=256)
    got = decoder.feed(noise) + decoder.feed(encode(good))
    for frame in got:
        assert Decoder(max_payload=256).feed(encode(frame)) == [frame]
    assert got[-1] == good


# --- the board device against a virtual board -----------------------------------------------------------


class VirtualBoardProcess:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "ambert.boards.virtual", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, text=True)
        self.path = self.proc.stdout.readline().strip()       # first line once the model is built
        if not self.path:
            raise RuntimeError("the virtual board did not start")

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def board_factory():
    started = []

    def start(*args):
        vb = VirtualBoardProcess(*args)
        started.append(vb)
        return vb
    yield start
    for vb in started:
        vb.close()


def _gemm_case(seed, m=37, k=70, n=45):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    bias = rng.integers(-5000, 5000, n)
    m0 = rng.integers(1 << 30, 1 << 31, n)
    shift = rng.integers(30, 40, n)
    want = ref_matmul(*(torch.from_numpy(np.array(x)) for x in (a, w, bias.astype(np.int32), m0, shift)), 8)
    return (a, w, bias, m0, shift), want.numpy()


@pytest.mark.parametrize("faults", [[], ["--flip", "3e-4", "--drop", "3e-4", "--dup", "3e-4", "--seed", "3"]],
                         ids=["clean", "damaged"])
def test_board_device_runs_programs_exactly(board_factory, faults):
    vb = board_factory(*faults)
    dev = BoardDevice(vb.path, stall_s=10, retry_s=0.05)
    assert (dev.shape.lanes, dev.shape.banks, dev.shape.bank_words) == (4, 4, 1024)   # from its HELLO
    for seed in range(3):
        case, want = _gemm_case(seed)
        prog, decode = gemm_program(dev.shape, *case, Mode.INT8)
        out, status = decode(dev._run(prog.words, prog.expect))
        assert parse_status(status) == Error(0) and np.array_equal(out, want)
    dev.close()


def test_a_bert_through_the_damaged_board_is_bit_exact(board_factory, tiny):
    qm, model, tok = tiny
    vb = board_factory("--flip", "2e-4", "--drop", "2e-4", "--dup", "2e-4", "--seed", "5")
    enc = encode_text(tok, ["the cat sat on the mat", "what is my name"])
    mod = OffloadedBert(qm, model.config, [BoardDevice(vb.path), CpuDevice()])
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"board": 6 * qm.config["layers"]}


def test_a_bert_through_a_virtual_icebreaker_is_bit_exact(board_factory, tiny):
    """The iCEBreaker's own configuration (its board file: bit-serial requantizer, compact array, one command
    at a time, 3 x 256 pool words), Verilated with the same UART PHY and link hardware, on a damaged line."""
    from ambert.boards import get_board
    qm, model, tok = tiny
    vb = board_factory("--board", "icebreaker", "--flip", "2e-4", "--drop", "2e-4", "--seed", "7")
    # one command at a time: the board takes no words, so acknowledges none, while a MATMUL runs — at most
    # ~15 ms on the board, ~0.5 s in this simulation (measured): the host's default patience, 40 unanswered
    # retransmissions 50 ms apart, is 2 s; a busy machine once ran out of it
    board = BoardDevice(vb.path, retry_s=0.2)
    want = get_board("icebreaker").config("small")
    assert board.shape == want.shape
    enc = encode_text(tok, ["the cat sat on the mat", "what is my name"])
    mod = OffloadedBert(qm, model.config, [board, CpuDevice()])
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"board": 6 * qm.config["layers"]}


def test_the_virtual_board_refuses_an_unknown_board_or_size(capsys):
    from ambert.boards.virtual import main
    for args, why in ((["--board", "nexys"], "unknown board 'nexys'"),
                      (["--board", "icebreaker", "--size", "huge"],
                       "icebreaker has sizes small, target, not 'huge'")):
        with pytest.raises(SystemExit):
            main(args)
        assert why in capsys.readouterr().err


def test_a_minilm_layer_through_the_damaged_virtual_board_is_bit_exact(board_factory, minilm):
    """A layer of the bundled model (its real shapes: the FFN's K = 1536 fills the pool) through the board
    top's UART, link hardware and accelerator: ~2 MB over a line that flips, drops and repeats bytes,
    about a minute."""
    qm, model, tok = minilm
    qm = dataclasses.replace(qm, layers=qm.layers[:1], config={**qm.config, "layers": 1})
    vb = board_factory("--bank-words", "4096", "--flip", "1e-5", "--drop", "1e-5", "--dup", "1e-5", "--seed", "11")
    board = BoardDevice(vb.path)
    enc = encode_text(tok, ["Hello there!"])
    mod = OffloadedBert(qm, model.config, [board, CpuDevice()])
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"board": 6 * qm.config["layers"]}
    assert board.link.endpoint.retransmitted > 0          # the damage cost frames, and they were sent again


def test_a_board_that_hangs_mid_run_falls_back_with_the_same_bits(board_factory, tiny):
    qm, model, tok = tiny
    vb = board_factory("--stall-after", "3000")
    enc = encode_text(tok, ["the cat sat on the mat", "what is my name"])
    board = BoardDevice(vb.path, stall_s=1.0, retry_s=0.02)
    mod = OffloadedBert(qm, model.config, [board, CpuDevice()])
    with pytest.warns(RuntimeWarning, match="stopped answering|no acknowledgement|not answering"):
        out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops.get("cpu", 0) > 0


def test_a_board_that_resets_mid_run_runs_the_gemm_again_after_the_handshake(board_factory, tiny):
    """A reset mid-transfer fails that program ("reset during the transfer"); the runtime handshakes,
    compiles the GEMM again for the empty pool and runs it on the board: nothing falls back."""
    qm, model, tok = tiny
    vb = board_factory("--reset-after", "3000")
    enc = encode_text(tok, ["the cat sat on the mat", "what is my name"])
    board = BoardDevice(vb.path, stall_s=1.0, retry_s=0.02)
    mod = OffloadedBert(qm, model.config, [board, CpuDevice()])
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"board": 6 * qm.config["layers"]} and mod.last_stats.recovered == 1


# a client that streams GEMMs to a board until it is killed: it says "sending" as each program starts
_CLIENT = """
import sys
import numpy as np
from ambert.sw.runtime.board import BoardDevice
from ambert.proto.isa import Program
dev = BoardDevice(sys.argv[1])
rng = np.random.default_rng(0)
while True:
    prog = Program(dev.shape)
    for _ in range(40):
        prog.load(0, rng.integers(-128, 128, (200, dev.shape.lanes), dtype=np.int8))
        prog.store(0, 200)
    print("sending", flush=True)
    dev._run(prog.words, prog.expect)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.15, 0.4])
def test_a_new_client_resynchronises_a_board_left_mid_stream(board_factory, tiny, delay_s):
    """A client killed while its program is on the line leaves the board mid-command, its answers
    unacknowledged; the next client's HELLO brings it back in step: every GEMM of a forward on the board."""
    qm, model, tok = tiny
    vb = board_factory()
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, vb.path], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            assert client.stdout.readline().strip() == "sending"
        time.sleep(delay_s)
    finally:
        client.kill()
        client.wait()
    enc = encode_text(tok, ["the cat sat on the mat", "what is my name"])
    mod = OffloadedBert(qm, model.config, [BoardDevice(vb.path, stall_s=5), CpuDevice()])
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"board": 6 * qm.config["layers"]}


def test_no_board_on_the_port_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="no board on .*nowhere"):
        BoardDevice(str(tmp_path / "nowhere"))


def test_bad_link_arguments_are_refused_with_the_reason():
    from ambert.sw.runtime import get_device
    with pytest.raises(ValueError, match="name the board's serial port"):
        get_device("board:")
    wire = _Wire(0)
    with pytest.raises(ValueError, match="window must be in"):
        Endpoint(wire.end(0), window=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        Endpoint(wire.end(0)).queue(b"abc")
