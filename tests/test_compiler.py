"""The compiler: the liveness-planned pool, pipelined multi-GEMM programs, weights resident across
programs, and the device schedule of a layer — each checked against the integer reference."""

import numpy as np
import pytest
import torch

from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import ARG_WORDS, HEADER, MODE_BITS, DeviceShape, Error, Mode, Opcode, parse_status
from ambert.sim.fastsim import FastSim
from ambert.sw.compiler.gemm import GemmOp, GemmPlan, Residency, compile_gemms, plan_gemm
from ambert.sw.compiler.layer import run_layer
from ambert.sw.compiler.pool import PoolFull, PoolPlanner
from ambert.sw.quant.ref import ref_layer, ref_matmul

SHAPE = DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128)   # built by the top tests too


def test_planner_reuses_released_ranges_and_reports_peak_against_naive():
    pool = PoolPlanner(SHAPE)
    a = pool.alloc(300, "a")
    b = pool.alloc(300, "b", forbid={a.bank})
    assert a.bank != b.bank and a.words == b.words == 300
    pool.release(a)
    c = pool.alloc(298, "c", forbid={b.bank})           # rounded up to 300: a's range, reused
    assert (c.bank, c.offset) == (a.bank, a.offset)
    assert pool.live_words == 600 and pool.peak_words == 600 and pool.naive_words == 900


def test_planner_prefers_banks_to_avoid_last_and_merges_neighbours():
    pool = PoolPlanner(SHAPE)
    r = pool.alloc(8, "r", avoid={0, 1, 2})
    assert r.bank == 3
    parts = [pool.alloc(256, f"p{i}", forbid={1, 2, 3}) for i in range(4)]
    assert [p.bank for p in parts] == [0] * 4
    with pytest.raises(PoolFull, match="no free range of 4 words in banks \\[0\\]"):
        pool.alloc(1, "more", forbid={1, 2, 3})
    for p in parts:
        pool.release(p)
    whole = pool.alloc(1024, "whole", forbid={1, 2, 3})          # the four ranges merged back into one
    assert (whole.bank, whole.offset) == (0, 0)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(r)
        pool.release(r)


def test_plan_splits_weights_small_enough_to_pipeline():
    shape = DeviceShape(lanes=16, banks=4, bank_words=16384, acc_depth=512)
    plan = plan_gemm(shape, 128, 1536, 384, Mode.INT16)
    per_tile = plan.k_tiles * 16 + 9
    assert plan.n_tiles_chunk * per_tile <= shape.bank_words // 4
    assert sum(n for _, n in plan.n_chunks(split_last=True)) == plan.n_tiles
    assert plan.n_chunks(split_last=True)[-1][1] == 1
    with pytest.raises(ValueError, match="K=65536 needs"):
        plan_gemm(shape, 1, 65536, 1, Mode.INT8)


def _op(rng, m, k, n, mode):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    bias = rng.integers(-5000, 5000, n)
    m0 = rng.integers(1 << 30, 1 << 31, n)
    shift = rng.integers(30, 40, n)
    return GemmOp(a, w, bias, m0, shift, mode)


def _want(op):
    return ref_matmul(*(torch.from_numpy(np.array(x)) for x in (op.a, op.w, op.bias.astype(np.int32), op.m0,
                                                                  op.shift)), MODE_BITS[op.mode]).numpy()


@pytest.fixture(scope="module")
def sim():
    return FastSim(AcceleratorConfig(SHAPE))


def test_a_pipelined_program_of_several_gemms_is_exact(sim):
    rng = np.random.default_rng(3)
    ops = [_op(rng, 70, 40, 90, Mode.INT8), _op(rng, 128, 100, 20, Mode.INT16), _op(rng, 200, 24, 50, Mode.INT32),
           _op(rng, 1, 3, 5, Mode.INT8)]
    compiled = compile_gemms(SHAPE, ops)
    assert compiled.steps > len(ops)                    # split into chunks, so it really pipelines
    assert compiled.peak_words <= SHAPE.pool_words < compiled.naive_words
    outs, status = compiled.decode(sim.run(compiled.program.words, compiled.program.expect).answers)
    assert parse_status(status) == Error(0)
    for op, out in zip(ops, outs):
        assert np.array_equal(out, _want(op))


def test_prefetched_weights_stay_resident_for_the_next_program(sim):
    rng = np.random.default_rng(4)
    first, second = _op(rng, 64, 60, 40, Mode.INT8), _op(rng, 64, 60, 48, Mode.INT16)
    residency = Residency(SHAPE)
    c1 = compile_gemms(SHAPE, [first], residency, prefetch=GemmOp(np.zeros((64, 60)), second.w, second.bias,
                                                                  second.m0, second.shift, second.mode))
    assert len(residency.chunks) == 1
    c2 = compile_gemms(SHAPE, [second], residency)
    cold = compile_gemms(SHAPE, [second])
    assert not residency.chunks and len(c2.program.words) < len(cold.program.words)
    for c, op in ((c1, first), (c2, second)):
        outs, status = c.decode(sim.run(c.program.words, c.program.expect).answers)
        assert parse_status(status) == Error(0) and np.array_equal(outs[0], _want(op))


def test_a_models_weights_stay_resident_the_coldest_going_first(sim):
    """Resident weights are not sent again by a later program. Kept weights take at most a quarter of the
    pool: with more than that run in turn, the hot GEMM's (the first, used often) stay, and a second pass
    finds those of the rest that fitted; every result is still `==` the reference (the device keeps its
    pool between programs, so each program runs on what earlier ones left)."""
    import dataclasses
    rng = np.random.default_rng(7)
    ops = [dataclasses.replace(_op(rng, 16, 60, 16, Mode.INT8), resident=True) for _ in range(8)]
    residency = Residency(SHAPE)
    cold = [len(compile_gemms(SHAPE, [op], Residency(SHAPE)).program.words) for op in ops]

    def run(op):
        c = compile_gemms(SHAPE, [op], residency)
        outs, status = c.decode(sim.run(c.program.words, c.program.expect).answers)
        assert parse_status(status) == Error(0) and np.array_equal(outs[0], _want(op))
        return len(c.program.words)

    sim.reset()
    assert run(ops[0]) == cold[0] and residency.chunks
    assert run(ops[0]) < cold[0] / 2 and run(ops[0]) < cold[0] / 2       # again: only A travels
    first = [run(op) for op in ops[1:]]                 # 8 x 16 x 60 weights: more than the quarter kept
    assert sum(r.words for r in residency.chunks.values()) <= SHAPE.pool_words // 4
    assert first == cold[1:]
    second = [run(op) for op in ops[1:]]
    assert run(ops[0]) < cold[0] / 2                    # the hot one stayed through both passes
    assert sum(second) < sum(first)                     # the second pass found some of the first's
    assert any(w == c for w, c in zip(second, cold[1:]))       # but not all: they do not fit


def test_the_loop_order_that_moves_fewer_words_is_chosen_and_both_are_exact(sim, monkeypatch):
    """Several row chunks against many weight chunks: rows first (A loaded once, the weights once per
    row chunk) beats weights first (A loaded again for every weight chunk); with two weight chunks that
    outweigh A, weights first wins. Either order gives the reference's bits."""
    rng = np.random.default_rng(11)
    wide, few = _op(rng, 300, 24, 200, Mode.INT16), _op(rng, 200, 8, 100, Mode.INT8)
    assert plan_gemm(SHAPE, 300, 24, 200, Mode.INT16).rows_first
    assert not plan_gemm(SHAPE, 200, 8, 100, Mode.INT8).rows_first
    words = {}
    for order in (None, False, True):
        if order is not None:
            monkeypatch.setattr(GemmPlan, "rows_first", property(lambda plan, order=order: order))
        for name, op in (("wide", wide), ("few", few)):
            c = compile_gemms(SHAPE, [op])
            outs, status = c.decode(sim.run(c.program.words, c.program.expect).answers)
            assert parse_status(status) == Error(0) and np.array_equal(outs[0], _want(op))
            words[name, order] = len(c.program.words)
    assert words["wide", None] == words["wide", True] < words["wide", False]
    assert words["few", None] == words["few", False] < words["few", True]


def _zero_tiles(rng, op, fraction):
    """``op`` with about ``fraction`` of its weights' ``lanes x lanes`` tiles zeroed, and its first n-tile
    all zero (its outputs are the bias alone)."""
    import dataclasses
    L = SHAPE.lanes
    w = op.w.copy()
    for n0 in range(0, w.shape[0], L):
        for k0 in range(0, w.shape[1], L):
            if n0 == 0 or rng.random() < fraction:
                w[n0:n0 + L, k0:k0 + L] = 0
    return dataclasses.replace(op, w=w)


def test_zero_weight_tiles_are_neither_sent_nor_computed(sim):
    """GEMMs whose weights have all-zero tiles run as MATMUL chains over the non-zero ones (row counts
    that need padding, every mode, a whole zero n-tile, several row chunks, a second program on resident
    weights): `==` the reference, in fewer host words and fewer device cycles than the same GEMMs with
    those tiles stored (made non-zero where they are zero, then compared against their own reference)."""
    import dataclasses
    rng = np.random.default_rng(12)
    dense = [_op(rng, 70, 40, 90, Mode.INT8), _op(rng, 130, 64, 20, Mode.INT16), _op(rng, 5, 24, 50, Mode.INT32),
             _op(rng, 300, 16, 12, Mode.INT8)]
    pruned = [dataclasses.replace(_zero_tiles(rng, op, 0.5), resident=True) for op in dense]
    assert all(op.runs(SHAPE) is not None for op in pruned) and all(op.runs(SHAPE) is None for op in dense)
    residency = Residency(SHAPE)
    cost = {}
    for name, ops in (("dense", dense), ("pruned", pruned), ("resident", pruned)):
        sim.reset() if name != "resident" else None
        c = compile_gemms(SHAPE, ops, residency if name != "dense" else Residency(SHAPE))
        run = sim.run(c.program.words, c.program.expect)
        outs, status = c.decode(run.answers)
        assert parse_status(status) == Error(0), name
        for op, out in zip(ops, outs):
            assert np.array_equal(out, _want(op)), name
        cost[name] = (len(c.program.words), run.cycles)
    assert cost["pruned"][0] < cost["dense"][0] and cost["pruned"][1] < cost["dense"][1]
    assert cost["resident"][0] < cost["pruned"][0]


def test_loads_and_stores_interleave_with_matmuls():
    rng = np.random.default_rng(5)
    prog = compile_gemms(SHAPE, [_op(rng, 64, 60, 200, Mode.INT8)]).program
    ops, i = [], 0
    while i < len(prog.words):
        head = HEADER.unpack(prog.words[i])
        op = Opcode(head["opcode"])
        ops.append(op)
        data = head["count"] * SHAPE.host_words_per_pool_word if op == Opcode.LOAD else 0
        i += 1 + ARG_WORDS[op] + data
    first_mm = ops.index(Opcode.MATMUL)
    # after the first MATMUL, each next one is preceded by loads (the prefetch) and a store of the last
    between = ops[first_mm + 1:ops.index(Opcode.MATMUL, first_mm + 1)]
    assert Opcode.LOAD in between
    assert ops[-1] == Opcode.SYNC and ops.count(Opcode.STORE) == ops.count(Opcode.MATMUL)


def test_the_device_schedule_of_a_layer_equals_the_reference(tiny):
    qm, _, tok = tiny
    enc = tok(["the cat sat on the mat", "hello"], padding=True, return_tensors="pt")
    x8, x16 = qm.embed(enc["input_ids"], enc["token_type_ids"])
    mask = enc["attention_mask"].bool()
    calls, hints = [], []

    def matmul(a, w, *rest):
        calls.append(tuple(w.shape))
        return ref_matmul(a, w, *rest)

    got = run_layer(qm.layers[0], x8, x16, mask, matmul, expect=lambda w, *rest: hints.append(tuple(w.shape)),
                    next_p=qm.layers[1])
    want = ref_layer(x8, x16, qm.layers[0], mask)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    c = qm.config["hidden"]
    assert calls[0] == (3 * c, c)                       # Q, K and V as one GEMM
    assert hints[-1] == (3 * c, c) and len(hints) == 4  # the last hint: the next layer's Q/K/V
