"""The MATMUL engine on its own, in Amaranth's simulator: its pool ports served by a model of the pool,
one MATMUL a case, the output region `==` the contract's ``ref_matmul``."""

from collections import deque

import numpy as np
import pytest

from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.hw.engine import MatmulEngine
from ambert.proto.isa import MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, Chain, DeviceShape, Mode
from ambert.sw.gemm_cases import random_case, reference
from conftest import simulate

SHAPE = DeviceShape(lanes=4, banks=4, bank_words=64, acc_depth=16)

# the engine's configurations: every knob that changes its schedule, each at least once
IMPLEMENTATIONS = {
    "full": Implementation(),
    "narrow-rl3": Implementation(requant_lanes=2, pool_read_latency=3),
    "registered": Implementation(requant_lanes=1, pool_subbanks=1, pool_read_latency=5, weight_write_latency=2,
                                 product_latency=2, hop_latency=2),
    "digit-serial": Implementation(requant_lanes=2, serial_mul_bits=8, pool_read_latency=2),
    "bit-serial": Implementation(requant_lanes=1, serial_mul_bits=1, pool_subbanks=1, overlap=False,
                                 compact_array=True),
}

# (M, K, N, mode): one tile, several k-tiles, several n-tiles, padding in K and N, every mode, M at the
# accumulators' depth
CASES = [(1, 4, 4, Mode.INT8), (5, 8, 8, Mode.INT16), (3, 12, 4, Mode.INT32), (6, 4, 12, Mode.INT8),
         (16, 6, 5, Mode.INT16), (2, 9, 7, Mode.INT8)]


def _word_int(row):
    return int.from_bytes(np.asarray(row, dtype=np.int8).tobytes(), "little")


def run_engine(config, pool, matmuls, max_cycles=40_000):
    """MATMULs one after another on one engine, its pool ports served from ``pool`` ({address: int word},
    written in place). ``matmuls``: dicts of the engine's arguments. Returns the cycles from the first
    ``start`` to the last ``done``."""
    shape, impl = config.shape, config.impl
    subbanks = impl.pool_subbanks
    dut = MatmulEngine(config, addr_bits=(shape.pool_words - 1).bit_length())
    result = {}

    async def bench(ctx):
        # each read port's words on their way, across MATMULs as in the pool: the word read in a cycle
        # arrives pool_read_latency later
        arriving = {port: deque([0] * impl.pool_read_latency) for port in (dut.a_rd, dut.w_rd)}

        async def cycle():
            for port, queue in arriving.items():
                ctx.set(port.data, queue.popleft())
            for port, queue in arriving.items():
                queue.append(pool.get(ctx.get(port.addr), 0) if ctx.get(port.en) else 0)
            enables, addr = ctx.get(dut.o_wr.en), ctx.get(dut.o_wr.addr)
            for s in range(subbanks):
                if enables >> s & 1:
                    pool[(addr & ~(subbanks - 1)) + s if subbanks > 1 else addr] = ctx.get(dut.o_wr.data[s])
            done = ctx.get(dut.done)
            await ctx.tick()
            return done

        cycles = 0
        for args in matmuls:
            for name, value in args.items():
                ctx.set(getattr(dut, name), value)
            ctx.set(dut.start, 1)
            await cycle()
            ctx.set(dut.start, 0)
            for n in range(max_cycles):
                if await cycle():
                    cycles += n + 2
                    break
            else:
                raise AssertionError(f"no done after {max_cycles} cycles")
        for _ in range(64):             # the last rows of a HOLD still on their way
            await cycle()
        result["cycles"] = cycles

    simulate(dut, bench)
    return result["cycles"]


def _load(pool, base, words):
    pool.update((base + i, _word_int(row)) for i, row in enumerate(words))


def _output(shape, pool, o_base, m, n, mode):
    o_count = -(-n // shape.lanes) * m * MODE_WORDS[mode]
    words = np.array([list(pool.get(o_base + i, 0).to_bytes(shape.lanes, "little")) for i in range(o_count)],
                     dtype=np.uint8).view(np.int8)
    return shape.unpack_output(words, m, n, mode)


def rtl_matmul(config, a, w, bias, m0, shift, mode):
    """One MATMUL on the engine: A at the pool's word 0, W and then P at bank 1, O at bank 2 (the
    sequencer's checks hold). Returns the output region's words as the engine wrote them and the cycles
    from ``start`` to ``done``."""
    shape = config.shape
    B, lanes = shape.bank_words, shape.lanes
    w_words = shape.pack_weights(w)
    pool = {}
    _load(pool, 0, shape.pack_activations(a))
    _load(pool, B, w_words)
    _load(pool, B + len(w_words), shape.pack_params(bias, m0, shift))
    m, n = a.shape[0], w.shape[0]
    args = dict(a_addr=0, w_addr=B, p_addr=B + len(w_words), o_addr=2 * B, m=m, k_tiles=-(-a.shape[1] // lanes),
                n_tiles=-(-n // lanes), mode=mode, cont=0, hold=0)
    cycles = run_engine(config, pool, [args])
    return _output(shape, pool, 2 * B, m, n, mode), cycles


def rtl_chains(config, a, w, bias, m0, shift, mode):
    """The GEMM as the compiler runs a weight with zero tiles: for each n-tile a chain of MATMULs over its
    runs of non-zero k-tiles (``proto.isa.Chain``), only those tiles in the pool. Returns the output and
    the cycles."""
    shape = config.shape
    B, lanes = shape.bank_words, shape.lanes
    m, n = a.shape[0], w.shape[0]
    runs = shape.weight_runs(w)
    w_words = shape.pack_weight_runs(w, runs)
    pool = {}
    _load(pool, 0, shape.pack_activations(a))
    _load(pool, B, w_words)
    _load(pool, B + len(w_words), shape.pack_params(bias, m0, shift))
    matmuls, w_at = [], B
    for t, tile_runs in enumerate(runs):
        for i, (k0, count) in enumerate(tile_runs):
            chain = (Chain.CONTINUE if i else 0) | (Chain.HOLD if i + 1 < len(tile_runs) else 0)
            matmuls.append(dict(a_addr=k0 * m, w_addr=w_at, p_addr=B + len(w_words) + t * PARAM_WORDS_PER_LANE_GROUP,
                                o_addr=2 * B + t * m * MODE_WORDS[mode], m=m, k_tiles=count, n_tiles=1, mode=mode,
                                cont=bool(chain & Chain.CONTINUE), hold=bool(chain & Chain.HOLD)))
            w_at += count * lanes
    cycles = run_engine(config, pool, matmuls)
    return _output(shape, pool, 2 * B, m, n, mode), cycles


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_engine_matches_the_contract(impl):
    config = AcceleratorConfig(SHAPE, IMPLEMENTATIONS[impl])
    rng = np.random.default_rng(sorted(IMPLEMENTATIONS).index(impl))
    for k, (m, kk, n, mode) in enumerate(CASES):
        case = random_case(rng, m, kk, n, mode, extreme=k % 3 == 2)
        got, cycles = rtl_matmul(config, *case, mode)
        assert np.array_equal(got, reference(*case, mode)), (impl, m, kk, n, mode)


def test_engine_keeps_one_row_a_cycle_on_a_long_tile():
    """M rows of a tile stream one a cycle: 2 k-tiles x 2 n-tiles of 16 rows take little more than the
    64 rows' cycles plus the array and the epilogue's latency, not a multiple of it."""
    config = AcceleratorConfig(SHAPE)
    case = random_case(np.random.default_rng(7), 16, 8, 8, Mode.INT8)
    got, cycles = rtl_matmul(config, *case, Mode.INT8)
    assert np.array_equal(got, reference(*case, Mode.INT8))
    tiles, gap = 4, 3 * SHAPE.lanes + 20          # a tile costs max(M, ~3L + 20) cycles (docs/architecture.md)
    assert cycles <= tiles * max(16, gap) + 60, cycles


def _zero_tiles(rng, w, lanes, pattern):
    """``w`` with tiles zeroed: ``pattern`` "random" (each tile with probability 1/2), "n-tile" (a whole
    n-tile), "row" (one k-tile in every n-tile), "single" (every tile but one)."""
    w = w.copy()
    nt, kt = -(-w.shape[0] // lanes), -(-w.shape[1] // lanes)
    keep = {"random": rng.random((nt, kt)) < 0.5, "n-tile": np.arange(nt)[:, None] != nt - 1 + 0 * np.arange(kt),
            "row": np.arange(kt)[None, :] != 1 + 0 * np.arange(nt)[:, None],
            "single": np.zeros((nt, kt), dtype=bool)}[pattern]
    if pattern == "single":
        keep[rng.integers(nt), rng.integers(kt)] = True
    for t in range(nt):
        for k in range(kt):
            if not keep[t, k]:
                w[t * lanes:(t + 1) * lanes, k * lanes:(k + 1) * lanes] = 0
    return w


@pytest.mark.parametrize("impl", ["full", "registered", "bit-serial"])
def test_chained_matmuls_skip_zero_tiles_and_match_the_contract(impl):
    """Weights with all-zero tiles (random ones, a whole n-tile, a k-tile in every n-tile, all but one):
    the chains over their non-zero runs `==` the contract, in fewer cycles than the dense MATMUL."""
    config = AcceleratorConfig(SHAPE, IMPLEMENTATIONS[impl])
    rng = np.random.default_rng(11)
    # (M: each output inside its bank of 64 words)
    for k, (pattern, m, mode) in enumerate([("random", 16, Mode.INT8), ("n-tile", 8, Mode.INT16),
                                             ("row", 4, Mode.INT32), ("single", 16, Mode.INT8)]):
        a, w, bias, m0, shift = random_case(rng, m, 16, 12, mode, extreme=k == 1)
        w = _zero_tiles(rng, w, SHAPE.lanes, pattern)
        runs = SHAPE.weight_runs(w)
        assert sum(c for r in runs for _, c in r) < 3 * 4, pattern
        got, cycles = rtl_chains(config, a, w, bias, m0, shift, mode)
        assert np.array_equal(got, reference(a, w, bias, m0, shift, mode)), (impl, pattern)
        if pattern == "single":
            _, dense_cycles = rtl_matmul(config, a, w, bias, m0, shift, mode)
            assert cycles < dense_cycles, (cycles, dense_cycles)
