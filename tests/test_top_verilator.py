"""The Verilated accelerator top, driven by the C++ clock loop: GEMMs of every shape, extremes, a real
MiniLM layer, and malformed instruction streams. Golden model: the contract's ref_gemm + ref_requant."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ambert.boards import get_board
from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.proto.isa import (ISA_VERSION, MAX_COUNT, Counters, DeviceShape, Error, Info, Mode, Program, header,
                              parse_status)
from ambert.sim.fastsim import FastSim, SimHang
from ambert.sw.gemm_cases import random_case, reference
from ambert.sw.compiler.gemm import gemm_program
from conftest import fuzz_examples

CONFIGS = {
    "4x4": AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128)),
    # the small-FPGA (iCE40) build: one column at a time through the bit-serial requantizer (last k-tiles
    # paced to it, parameters in a block RAM), the sequencer's multiplies bit-serial too and one command
    # at a time, one memory a pool bank, the array's compact layout
    "4x4-ice40": AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=2048, acc_depth=128),
                                   Implementation(requant_lanes=1, serial_mul_bits=1, pool_subbanks=1, overlap=False,
                                                  compact_array=True)),
    # the ULX3S medium: the pool's memory outputs registered (read latency 2)
    "8x8-ecp5": get_board("ulx3s").config("medium"),
    # the ULX3S target: 12 lanes, the requantizer two columns a cycle, the pool's read addresses registered
    # too (read latency 3), the weight writes registered once a column
    "12x12-ecp5": get_board("ulx3s").config("target"),
    "16x16": AcceleratorConfig(DeviceShape(lanes=16, banks=4, bank_words=16384, acc_depth=512)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def device(request):
    return FastSim(CONFIGS[request.param])


@pytest.fixture(scope="module")
def device16():
    return FastSim(CONFIGS["16x16"])


def run_gemm(sim, a, w, bias, m0, shift, mode):
    prog, decode = gemm_program(sim.config.shape, a, w, bias, m0, shift, mode)
    result = sim.run(prog.words, prog.expect)
    out, status = decode(result.answers)
    assert parse_status(status) == Error(0)
    return out


# (30, 3, 9): one k-tile, so every tile is a last one, and long enough that the next starts at once
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 7), (17, 33, 9), (30, 3, 9), (64, 64, 64), (40, 130, 70),
                                     (300, 500, 200)])
def test_random_gemm(device, m, k, n):
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    for mode in Mode:
        case = random_case(rng, m, k, n, mode)
        assert np.array_equal(run_gemm(device, *case, mode), reference(*case, mode))


@pytest.mark.parametrize("mode", list(Mode))
def test_extreme_products_at_k3072(device16, mode):
    rng = np.random.default_rng(int(mode))
    m, k, n = 20, 3072, 24
    a = np.full((m, k), -128, dtype=np.int8)
    w = np.full((n, k), -128, dtype=np.int8)
    w[n // 2:] = 127
    a[m // 2:] = rng.choice(np.array([-128, 127], dtype=np.int8), size=(m - m // 2, k))
    bias = rng.integers(-1000, 1000, n).astype(np.int64)
    m0 = np.full(n, (1 << 31) - 1)
    shift = rng.integers(20, 40, n)
    assert np.array_equal(run_gemm(device16, a, w, bias, m0, shift, mode), reference(a, w, bias, m0, shift, mode))


@pytest.mark.parametrize("config", ["16x16", "4x4-ice40"])
def test_minilm_layer_gemms(config, device16, minilm):
    """Every GEMM of layer 0 of the quantized bundled MiniLM, on a real sentence, through the top."""
    sim = device16 if config == "16x16" else FastSim(CONFIGS[config])
    from ambert.sw.quant.hf import encode
    from ambert.sw.quant.ref import ref_layer
    qm, _, tok = minilm
    enc = encode(tok, ["The quick brown fox jumps over the lazy dog near the river bank."])
    x8, x16 = qm.embed(enc["input_ids"])
    p = qm.layers[0]
    tr = {}
    ref_layer(x8, x16, p, enc["attention_mask"].bool(), tr)
    n = lambda t: t[0].numpy()                     # noqa: E731 -- first (only) sentence
    c, heads = qm.config["hidden"], p.heads
    d = c // heads
    per = lambda v, size: np.broadcast_to(np.asarray(v), (size,))   # noqa: E731
    checks = [
        ("Q", n(x8), p.wq, p.bq, p.q_m0, p.q_shift, Mode.INT8, n(tr["q"])),
        ("K", n(x8), p.wk, p.bk, p.k_m0, p.k_shift, Mode.INT8, n(tr["k"])),
        ("V", n(x8), p.wv, p.bv, p.v_m0, p.v_shift, Mode.INT8, n(tr["v"])),
        ("O", n(tr["ctx"]), p.wo, p.bo, p.o_m0, p.o_shift, Mode.INT16, n(tr["attn"])),
        ("FFN1", n(tr["h8"]), p.w1, p.b1, p.f1_m0, p.f1_shift, Mode.INT16, n(tr["f1"])),
        ("FFN2", n(tr["g"]), p.w2, p.b2, p.f2_m0, p.f2_shift, Mode.INT16, n(tr["f2"])),
    ]
    for name, a, w, b, m0, sh, mode, want in checks:
        got = run_gemm(sim, a, w.numpy(), b.numpy(), np.asarray(m0), np.asarray(sh), mode)
        assert np.array_equal(got, want), name
    q, k, v, probs = n(tr["q"]), n(tr["k"]), n(tr["v"]), n(tr["probs"])
    t = q.shape[0]
    scores = np.zeros((heads, t, t), dtype=np.int16)
    ctx = np.zeros((t, c), dtype=np.int8)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores[h] = run_gemm(sim, q[:, cols], k[:, cols], np.zeros(t), per(p.score_m0, t),
                             per(p.score_shift, t), Mode.INT16)
        ctx[:, cols] = run_gemm(sim, probs[h], v[:, cols].T.copy(), np.zeros(d),
                                p.ctx_m0[cols].numpy(), p.ctx_shift[cols].numpy(), Mode.INT8)
    assert np.array_equal(scores, n(tr["score"])), "QK^T"
    assert np.array_equal(ctx, n(tr["ctx"])), "P.V"


def fuzz_words(rng, n_words):
    """Random instruction-stream garbage, biased toward plausible headers so the decoder's paths run."""
    words = []
    while len(words) < n_words:
        r = rng.random()
        if r < 0.5:
            op = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 0x55, 0xFF]))
            words.append(header(op, int(rng.integers(0, 1 << 16)) if rng.random() < 0.3
                                else int(rng.integers(0, 40)), int(rng.integers(0, 8))))
            words += [int(x) for x in rng.integers(0, 1 << 32, int(rng.integers(0, 8)), dtype=np.uint64)]
        else:
            words.append(int(rng.integers(0, 1 << 32, dtype=np.uint64)))
    return words


@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_streams_never_hang_and_a_valid_program_runs_after(seed):
    cfg = CONFIGS["4x4"]
    sim = FastSim(cfg)
    rng = np.random.default_rng(seed)
    garbage = fuzz_words(rng, 3000)
    # zeros are NOPs: enough of them finish any LOAD the garbage opened (at most 65535 pool words)
    flush = [0] * (MAX_COUNT * cfg.shape.host_words_per_pool_word + 16)
    case = random_case(rng, 23, 37, 11, Mode.INT8)
    prog, decode = gemm_program(cfg.shape, *case, Mode.INT8)
    words = garbage + flush + Program(cfg.shape).sync().sync().words + prog.words
    result = sim.run(words, 0, idle_limit=100_000)         # raises SimHang if the device stops
    assert result.taken == len(words)
    tail = result.answers[len(result.answers) - prog.expect - 2:]
    first, second = parse_status(tail[0]), parse_status(tail[1])
    assert second == Error(0)                               # the first SYNC cleared the flags
    out, status = decode(tail[2:])
    assert parse_status(status) == Error(0)
    assert np.array_equal(out, reference(*case, Mode.INT8))
    del first


@pytest.fixture(scope="module")
def fuzz_sim():
    return FastSim(CONFIGS["4x4"])


@settings(max_examples=fuzz_examples(40))
@given(st.integers(0, 2**32 - 1), st.integers(1, 2000))
def test_fuzz_streams_then_the_runtime_gets_the_next_gemm_right(fuzz_sim, seed, n_words):
    """Random garbage left in the device (no flush: it may stop mid-command, error flags set), then the
    runtime's next GEMM: never a hang, never a wrong answer — run on the device (after at most one reset
    and retry) and `==` the reference."""
    import torch
    from ambert.sw.runtime.sim import SimDevice
    rng = np.random.default_rng(seed)
    try:
        fuzz_sim.run(fuzz_words(rng, n_words), 0, idle_limit=100_000)
    except SimHang:
        pytest.fail("the device hung on garbage: it must keep taking words")
    dev = SimDevice(CONFIGS["4x4"], sim=fuzz_sim)
    a, w, bias, m0, shift = random_case(rng, int(rng.integers(1, 40)), int(rng.integers(1, 50)),
                                        int(rng.integers(1, 30)), Mode.INT8)
    out = dev.matmul(*(torch.from_numpy(np.asarray(x)) for x in (a, w, bias, m0, shift)), 8)
    assert np.array_equal(out.numpy(), reference(a, w, bias, m0, shift, Mode.INT8))
    assert dev.stats.recovered <= 1


@pytest.mark.parametrize("config", ["4x4", "4x4-ice40"])
def test_errors_are_reported_and_decoding_goes_on(config):
    """Every error, on the full-size sequencer and on the small-FPGA one (its region sizes bit-serial
    products kept as their low bits and a sticky "longer" flag)."""
    cfg = CONFIGS[config]
    sim = FastSim(cfg)
    B = cfg.shape.bank_words
    prog = (Program(cfg.shape)
            .sync()
            .matmul(0, B, B + 100, 2 * B, 0, 1, 1, Mode.INT8).sync()          # M = 0
            .matmul(0, B, B + 100, 2 * B, 4, 1, 1, 3).sync()                  # bad mode
            .matmul(0, 0, B + 100, 2 * B, 4, 1, 1, Mode.INT8).sync()          # A and W share a bank
            .matmul(0, B, B + 100, 2 * B + 2, 4, 1, 1, Mode.INT8).sync()      # misaligned output
            .matmul(B - 2, B + 4, B + 100, 2 * B, 4, 1, 1, Mode.INT8).sync()  # A runs off its bank
            # A far longer than a bank, W exactly one: M x kt = 2**16 words, whose bits all leave the
            # small sequencer's kept low bits before the product ends (only the sticky flag remembers)
            .matmul(0, B, B + 100, 2 * B, cfg.shape.acc_depth, B // cfg.shape.lanes, 1, Mode.INT8).sync()
            .matmul(0, B, B + 100, 2 * B, 1, 1 << 15, 1, Mode.INT8).sync()    # kt alone is too long
            .store(cfg.shape.pool_words - 1, 2).sync()                              # STORE past the pool
            .load(cfg.shape.pool_words - 1, np.zeros((2, cfg.shape.lanes), np.int8)).sync()  # LOAD past the pool
            # addresses with bits above the pool's address width (the device keeps only those it has)
            .matmul(1 << 31, B, B + 100, 2 * B, 4, 1, 1, Mode.INT8).sync()
            .matmul(0, B, B + 100, (1 << 20) + 2 * B, 4, 1, 1, Mode.INT8).sync()
            .store(1 << 24, 1).sync()
            .load((1 << 30) + 5, np.zeros((1, cfg.shape.lanes), np.int8)).sync()
            .info())
    prog.words.insert(1, header(0x77))                                        # unknown opcode
    prog.words.insert(2, header(0x04))                                        # SYNC
    expect = prog.expect + 1 - 3 * cfg.shape.host_words_per_pool_word     # +1 SYNC; the bad STOREs answer nothing
    answers = sim.run(prog.words, expect).answers
    assert len(answers) == expect
    flags = [parse_status(w) for w in answers[:-3]]
    assert flags == [Error(0), Error.OPCODE, Error.SHAPE, Error.SHAPE, Error.BANK, Error.ADDRESS,
                     Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS] + [Error.ADDRESS] * 4
    assert Info.unpack(answers[-3:]) == Info(ISA_VERSION, cfg.shape)


def test_counters_count_one_matmul(device16):
    cfg = device16.config
    rng = np.random.default_rng(9)
    m, k, n = 128, 384, 384
    case = random_case(rng, m, k, n, Mode.INT8)
    prog, _ = gemm_program(cfg.shape, *case, Mode.INT8)
    words = Program(cfg.shape).counters().words + prog.words + Program(cfg.shape).counters().words
    nc = Counters.WORDS
    ans = device16.run(words, prog.expect + 2 * nc).answers
    before, after = Counters.unpack(ans[:nc]), Counters.unpack(ans[-nc:])
    busy, stalled, macs = (x - y for x, y in zip(after, before))
    assert macs == m * (k // 16) * (n // 16) * 256
    assert stalled < busy and busy - stalled == macs // 256


# --- concurrency: MATMUL and STORE run behind the decoder; every hazard must wait -----------------------


def _operands(cfg, rng, m, k, n, mode=Mode.INT8):
    a, w, bias, m0, shift = random_case(rng, m, k, n, mode)
    wq, params = cfg.shape.pack_weights(w), cfg.shape.pack_params(bias, m0, shift)
    return (a, w, bias, m0, shift), cfg.shape.pack_activations(a), np.concatenate([wq, params]), len(wq)


def test_hazards_against_running_units_are_held_back():
    """Back-to-back commands that would race a running MATMUL or STORE if nothing held them: each result
    must equal what the commands give one at a time."""
    cfg = CONFIGS["4x4"]
    sim = FastSim(cfg)
    B, rng = cfg.shape.bank_words, np.random.default_rng(21)
    m, k, n = 60, 32, 24          # A 480 words, W+P 246, O 360: each fits its bank of 1024
    kt, nt = k // cfg.shape.lanes, n // cfg.shape.lanes
    case1, a1, wp1, nw1 = _operands(cfg, rng, m, k, n)
    case2, a2, wp2, nw2 = _operands(cfg, rng, m, k, n)
    out_words = nt * m
    prog = (Program(cfg.shape).load(0, a1).load(B, wp1).load(2 * B, wp2)
            .matmul(0, B, B + nw1, 3 * B, m, kt, nt, Mode.INT8)
            .load(0, a2)                        # over the A range the MATMUL is reading (WAR)
            .store(3 * B, out_words)            # the range it is writing (RAW)
            .load(3 * B, np.zeros((out_words, cfg.shape.lanes), np.int8))   # over the range being stored (WAR)
            .matmul(0, 2 * B, 2 * B + nw2, B + 512, m, kt, nt, Mode.INT8)
            .store(B + 512, out_words)
            .matmul(0, 2 * B, 2 * B + nw2, 3 * B, m, kt, nt, Mode.INT8)   # O over ... a range just stored
            .store(3 * B, out_words).sync())
    ans = sim.run(prog.words, prog.expect).answers
    h = cfg.shape.host_words_per_pool_word * out_words
    outs = [cfg.shape.unpack_output(cfg.shape.words_from_host(ans[i * h:(i + 1) * h]), m, n, Mode.INT8) for i in range(3)]
    assert parse_status(ans[-1]) == Error(0)
    assert np.array_equal(outs[0], reference(*case1, Mode.INT8))
    want2 = reference(*case2, Mode.INT8)              # its A arrived while the first MATMUL ran
    assert np.array_equal(outs[1], want2) and np.array_equal(outs[2], want2)


def test_transfers_overlap_a_running_matmul():
    """A LOAD to a bank the MATMUL does not write, and a STORE of a bank it does not read, run while it
    computes: the same commands finish sooner than with a SYNC (wait for idle) after the MATMUL."""
    cfg = CONFIGS["16x16"]
    B, rng = cfg.shape.bank_words, np.random.default_rng(5)
    m, k, n = 256, 512, 128
    kt, nt = k // cfg.shape.lanes, n // cfg.shape.lanes
    _, a, wp, nw = _operands(cfg, rng, m, k, n)
    extra = rng.integers(-128, 128, (4096, cfg.shape.lanes), dtype=np.int8)

    def cycles(serial):
        sim = FastSim(cfg)
        setup = Program(cfg.shape).load(0, a).load(B, wp).load(3 * B, extra).sync()
        sim.run(setup.words, setup.expect)
        prog = Program(cfg.shape).matmul(0, B, B + nw, 2 * B, m, kt, nt, Mode.INT8)
        if serial:
            prog.sync()
        prog.load(B + 8192, extra).store(3 * B, len(extra)).sync()     # beside W in its bank; the spare bank
        result = sim.run(prog.words, prog.expect)
        stored = cfg.shape.words_from_host(result.answers[serial:serial + len(extra) * 4])
        assert np.array_equal(stored, extra)
        return result.cycles
    overlapped, serial = cycles(False), cycles(True)
    compute = nt * kt * m
    assert overlapped < serial - compute // 2, (overlapped, serial)


@pytest.mark.parametrize("bits", [4, 16])
def test_other_digit_widths_and_two_requantizer_columns(bits):
    """The digit-serial multiplies at other widths (the ``4x4-ice40`` configuration runs 1 bit), with
    two requantizer columns a cycle: a row then takes 2 x 8 or 2 x 2 cycles."""
    cfg = AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128),
                            Implementation(requant_lanes=2, serial_mul_bits=bits, pool_subbanks=1))
    sim = FastSim(cfg)
    rng = np.random.default_rng(bits)
    for mode in Mode:
        for shape in ((17, 33, 9), (40, 130, 70)):
            case = random_case(rng, *shape, mode)
            assert np.array_equal(run_gemm(sim, *case, mode), reference(*case, mode)), (mode, shape)


def test_processes_starting_at_once_build_the_model_once(tmp_path):
    """Three processes asking for the same model on an empty cache: one builds it, the others wait for
    it, and all three run it."""
    probe = ("import sys\n"
             "from ambert.hw.config import AcceleratorConfig\n"
             "from ambert.proto.isa import DeviceShape, Program, parse_status\n"
             "from ambert.sim.fastsim import FastSim\n"
             "shape = DeviceShape(lanes=4, banks=3, bank_words=64, acc_depth=16)\n"
             "sim = FastSim(AcceleratorConfig(shape), build_root=sys.argv[1])\n"
             "status = sim.run(Program(shape).sync().words, 1).answers[0]\n"
             "print(int(sim.built), int(parse_status(status)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", probe, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert sorted(out.split()[0] for out, _ in results) == ["0", "0", "1"]
    assert all(out.split()[1] == "0" for out, _ in results)
    entries = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].endswith(".building"), entries     # one entry, no staging left
