"""The MATMUL engine on its own, in Amaranth's simulator: its pool ports served by a model of the pool,
one MATMUL a case, the output region `==` the contract's ``ref_matmul``."""

from collections import deque

import numpy as np
import pytest

from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.hw.engine import MatmulEngine
from ambert.proto.isa import MODE_WORDS, DeviceShape, Mode
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


def rtl_matmul(config, a, w, bias, m0, shift, mode, max_cycles=40_000):
    """One MATMUL on the engine: A at the pool's word 0, W and then P at bank 1, O at bank 2 (the
    sequencer's checks hold). Returns the output region's words as the engine wrote them and the cycles
    from ``start`` to ``done``."""
    shape, impl = config.shape, config.impl
    B, lanes, subbanks = shape.bank_words, shape.lanes, impl.pool_subbanks
    w_words = shape.pack_weights(w)
    pool = {}
    for base, words in ((0, shape.pack_activations(a)), (B, w_words),
                        (B + len(w_words), shape.pack_params(bias, m0, shift))):
        pool.update((base + i, _word_int(row)) for i, row in enumerate(words))
    m, n = a.shape[0], w.shape[0]
    n_tiles, k_tiles = -(-n // lanes), -(-a.shape[1] // lanes)
    o_base, o_count = 2 * B, n_tiles * m * MODE_WORDS[mode]
    dut = MatmulEngine(config, addr_bits=(shape.pool_words - 1).bit_length())
    result = {}

    async def bench(ctx):
        args = ((dut.a_addr, 0), (dut.w_addr, B), (dut.p_addr, B + len(w_words)), (dut.o_addr, o_base),
                (dut.m, m), (dut.k_tiles, k_tiles), (dut.n_tiles, n_tiles), (dut.mode, mode))
        for sig, value in args:
            ctx.set(sig, value)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        # each read port's words on their way: the word read in a cycle arrives pool_read_latency later
        arriving = {port: deque([0] * impl.pool_read_latency) for port in (dut.a_rd, dut.w_rd)}
        for cycle in range(max_cycles):
            for port, queue in arriving.items():
                ctx.set(port.data, queue.popleft())
            for port, queue in arriving.items():
                queue.append(pool.get(ctx.get(port.addr), 0) if ctx.get(port.en) else 0)
            enables, addr = ctx.get(dut.o_wr.en), ctx.get(dut.o_wr.addr)
            for s in range(subbanks):
                if enables >> s & 1:
                    pool[(addr & ~(subbanks - 1)) + s if subbanks > 1 else addr] = ctx.get(dut.o_wr.data[s])
            if ctx.get(dut.done):
                result["cycles"] = cycle + 1
                return
            await ctx.tick()
        raise AssertionError(f"no done after {max_cycles} cycles")

    simulate(dut, bench)
    words = np.array([list(pool.get(o_base + i, 0).to_bytes(lanes, "little")) for i in range(o_count)],
                     dtype=np.uint8).view(np.int8)
    return shape.unpack_output(words, m, n, mode), result["cycles"]


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
