"""Each hardware block in Amaranth's simulator (async testbenches) against the contract's ref_* functions."""

import random

import numpy as np
import pytest
import torch

from ambert.hw.array import SystolicArray
from ambert.hw.bufpool import BufferPool
from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.proto.isa import DeviceShape, Error, Mode, Program, parse_status
from ambert.hw.pe import ProcessingElement
from ambert.hw.requant import BitSerialRequantizer, Requantizer
from ambert.hw.top import Accelerator
from ambert.sw.compiler.gemm import gemm_program
from ambert.sw.quant.ref import ref_gemm, ref_requant
from conftest import simulate


def test_pe_macs_the_selected_weight():
    dut = ProcessingElement()
    rng = random.Random(0)
    extremes = [(-128, -128), (-128, 127), (127, -128), (127, 127), (0, -128), (-1, -1)]

    async def bench(ctx):
        w = [0, 0]
        prev = None         # (a, weight) presented last cycle: its product meets this cycle's psum_in
        for step in range(400):
            a, p, sel = rng.randint(-128, 127), rng.randint(-2**30, 2**30), rng.randint(0, 1)
            we, bank, wd = rng.random() < 0.3, rng.randint(0, 1), rng.randint(-128, 127)
            if step < 2 * len(extremes):
                a, wd = extremes[step // 2]
                we, bank, sel = step % 2 == 0, 0, 0      # write the extreme weight, then use it
            for sig, v in ((dut.a_in, a), (dut.psum_in, p), (dut.sel_in, sel), (dut.w_we, we),
                           (dut.w_bank, bank), (dut.w_data, wd)):
                ctx.set(sig, v)
            await ctx.tick()
            if prev is not None:
                want = ref_gemm(torch.tensor([[prev[0]]], dtype=torch.int8),
                                torch.tensor([[prev[1]]], dtype=torch.int8), torch.tensor([p], dtype=torch.int32)).item()
                assert ctx.get(dut.psum_out) == want, step
            assert ctx.get(dut.a_out) == a and ctx.get(dut.sel_out) == sel
            prev = (a, w[sel])
            if we:
                w[bank] = wd
    simulate(dut, bench)


@pytest.mark.parametrize("rows, cols, paired, write_latency, product_latency, hop_latency", [
    (2, 2, False, 0, 1, 1), (3, 5, False, 0, 1, 1), (4, 4, False, 0, 1, 1), (4, 4, True, 0, 1, 1),
    (8, 4, True, 0, 1, 1), (3, 5, False, 1, 1, 1), (4, 4, False, 1, 1, 1), (3, 5, False, 0, 2, 1),
    (4, 4, False, 1, 2, 1), (3, 5, False, 0, 1, 2), (4, 4, False, 1, 2, 2), (3, 4, False, 2, 2, 2)])
def test_array_rows_come_out_after_exactly_latency_cycles(rows, cols, paired, write_latency, product_latency,
                                                          hop_latency):
    dut = SystolicArray(rows, cols, paired=paired, write_latency=write_latency, product_latency=product_latency,
                        hop_latency=hop_latency)
    assert dut.latency == (rows + 2 if paired else rows + hop_latency * cols + product_latency)
    rng = np.random.default_rng(rows * 10 + cols)
    weights = rng.integers(-128, 128, (2, rows, cols), dtype=np.int8)
    # the extremes of every column sum among the rows
    weights[0, :, 0], weights[0, :, 1], weights[1, :, 0], weights[1, :, 1] = -128, 127, 127, -128
    extremes = [(np.full(rows, -128, np.int8), s) for s in (0, 1)] + [(np.full(rows, 127, np.int8), 0)]
    inputs = extremes + [(rng.integers(-128, 128, rows, dtype=np.int8), int(rng.integers(0, 2))) for _ in range(12)]
    out_cycles, outs = [], []

    async def bench(ctx):
        for b in range(2):
            for i in range(rows):
                ctx.set(dut.w_we, 1)
                ctx.set(dut.w_row, i)
                ctx.set(dut.w_bank, b)
                ctx.set(dut.w_data, [int(v) for v in weights[b, i]])
                await ctx.tick()
        ctx.set(dut.w_we, 0)
        for _ in range(write_latency):          # the last write lands
            await ctx.tick()
        for t in range(len(inputs) + dut.latency + 2):
            if t < len(inputs):
                a, s = inputs[t]
                ctx.set(dut.a, [int(v) for v in a])
                ctx.set(dut.sel, s)
            ctx.set(dut.valid, t < len(inputs))
            await ctx.tick()
            if ctx.get(dut.out_valid):
                out_cycles.append(t + 1)
                outs.append([ctx.get(dut.out[j]) for j in range(cols)])
    simulate(dut, bench)
    want = [ref_gemm(torch.from_numpy(a[None]), torch.from_numpy(weights[s].T.copy()))[0].tolist() for a, s in inputs]
    assert outs == want
    # presented in cycle t (sampled at edge t + 1), out in cycle t + latency
    assert out_cycles == [t + dut.latency for t in range(len(inputs))]


def test_array_refuses_bad_shapes():
    with pytest.raises(ValueError, match="rows"):
        SystolicArray(1, 4)
    with pytest.raises(ValueError, match="cols"):
        SystolicArray(4, 33)
    with pytest.raises(ValueError, match="paired products need an even number of columns, not 5"):
        SystolicArray(4, 5, paired=True)
    with pytest.raises(ValueError, match="write_latency must be 0, 1 or 2, not 3"):
        SystolicArray(4, 4, write_latency=3)
    with pytest.raises(ValueError, match="product_latency must be 1 or 2, not 3"):
        SystolicArray(4, 4, product_latency=3)
    with pytest.raises(ValueError, match="paired products are registered once"):
        SystolicArray(4, 4, paired=True, product_latency=2)
    with pytest.raises(ValueError, match="paired products keep their weights in a block RAM a row"):
        SystolicArray(4, 4, paired=True, write_latency=1)
    with pytest.raises(ValueError, match="hop_latency must be 1 or 2, not 0"):
        SystolicArray(4, 4, hop_latency=0)
    with pytest.raises(ValueError, match="paired products broadcast each row's activation"):
        SystolicArray(4, 4, paired=True, hop_latency=2)


def _requant_rows(rng, lanes, n):
    """n random rows (acc, bias, m0, shift, mode), the extremes of m0 and shift among them."""
    rows = []
    for _ in range(n):
        acc = [rng.choice([rng.randint(-2**31, 2**31 - 1 - 2**20), rng.randint(-5000, 5000)])
               for _ in range(lanes)]
        bias = [rng.randint(-2**20, 0) if a > 0 else rng.randint(0, 2**20) for a in acc]
        m0 = [rng.choice([rng.randint(0, 2**31 - 1), 2**31 - 1, 1 << 30, 0, 1]) for _ in range(lanes)]
        shift = [rng.choice([rng.randint(0, 62), 0, 1, 62, 31, 46, 47]) for _ in range(lanes)]
        rows.append((acc, bias, m0, shift, rng.randint(0, 2)))
    return rows


def _want_requant(rows):
    want = []
    for acc, bias, m0, shift, mode in rows:
        s = torch.tensor([a + b for a, b in zip(acc, bias)], dtype=torch.int32)
        want.append(s.tolist() if mode == Mode.INT32 else
                    ref_requant(s, torch.tensor(m0), torch.tensor(shift), 8 if mode == Mode.INT8 else 16).tolist())
    return want


@pytest.mark.parametrize("group, digit_bits, product_latency, load_copies", [
    (4, None, 1, False), (2, None, 1, False), (1, None, 1, False), (4, 8, 1, False), (1, 8, 1, False),
    (2, 4, 1, False), (1, 16, 1, False), (4, None, 2, False), (2, None, 2, False), (1, 8, 2, False),
    (1, None, 2, True), (2, 8, 1, True)])
def test_requantizer_matches_ref_requant(group, digit_bits, product_latency, load_copies):
    lanes = 4
    dut = Requantizer(lanes, group, digit_bits, product_latency, load_copies)
    assert dut.steps == lanes // group * (1 if digit_bits is None else -(-31 // digit_bits))
    # (a row taking several steps is copied first; a full-width product takes two cycles, three with its
    # operands registered, and then its shift two; a digit-serial one has none)
    assert dut.latency == (4 + dut.steps + (dut.steps > 1) + (digit_bits is None) * product_latency
                           + (digit_bits is None and product_latency == 2))
    rng = random.Random(3)
    rows = _requant_rows(rng, lanes, 300)
    rows[0] = ([1, 3, -1, -3], [0] * 4, [1 << 30] * 4, [31] * 4, int(Mode.INT8))      # ties
    # rows as fast as the datapath takes them (every `steps` cycles), and now and then a gap
    starts, t = [], 0
    for _ in rows:
        starts.append(t)
        t += dut.steps + (rng.randint(1, 3) if rng.random() < 0.2 else 0)
    got, out_cycles = [], []

    async def bench(ctx):
        for t in range(starts[-1] + dut.latency + 2):
            i = starts.index(t) if t in starts else None
            if i is not None:
                acc, bias, m0, shift, mode = rows[i]
                for sig, v in ((dut.acc, acc), (dut.bias, bias), (dut.m0, m0), (dut.shift, shift), (dut.mode, mode)):
                    ctx.set(sig, v)
            else:       # what is on the ports between rows must not matter
                ctx.set(dut.acc, [rng.randint(-2**31, 2**31 - 1) for _ in range(lanes)])
            ctx.set(dut.valid, i is not None)
            if load_copies:
                ctx.set(dut.load, (1 << lanes // group) - 1 if i is not None else 0)
            await ctx.tick()
            if ctx.get(dut.out_valid):
                got.append([ctx.get(dut.out[j]) for j in range(lanes)])
                out_cycles.append(t)
    simulate(dut, bench)
    assert got == _want_requant(rows)
    assert got[0] == [1, 2, 0, -1]
    # presented in cycle t (sampled at edge t + 1), out_valid seen after edge t + latency
    assert out_cycles == [t + dut.latency - 1 for t in starts]


@pytest.mark.parametrize("lanes, n_rows", [(4, 300), (12, 24)])
def test_bit_serial_requantizer_matches_ref_requant(lanes, n_rows):
    dut = BitSerialRequantizer(lanes, tag_bits=9)
    assert dut.steps == dut.latency == 68 * lanes + 2
    config = DeviceShape(lanes=lanes)
    rng = random.Random(5)
    rows = _requant_rows(rng, lanes, n_rows)
    rows[0] = ([1, 3, -1, -3] * (lanes // 4), [0] * lanes, [1 << 30] * lanes, [31] * lanes, int(Mode.INT8))  # ties
    # the extremes: the largest products both ways, at the shifts where the window and the sign meet
    rows[1] = ([-2**31, 2**31 - 1, -2**31, 2**31 - 1] * (lanes // 4), [0] * lanes, [2**31 - 1] * lanes,
               [62, 62, 0, 47] * (lanes // 4), int(Mode.INT16))
    rows[2] = ([-2**31, 2**31 - 1, -70000, 65535] * (lanes // 4), [0] * lanes,
               [2**31 - 1, 2**31 - 1, 1, 1] * (lanes // 4), [61, 61, 1, 1] * (lanes // 4), int(Mode.INT16))
    # each row's parameters as the pool holds them (proto.isa), one word a read, one cycle late
    words = []
    for acc, bias, m0, shift, mode in rows:
        raw = config.pack_params(bias, m0, shift).view(np.uint8).reshape(9, lanes)
        words.append([int.from_bytes(bytes(w), "little") for w in raw])
    starts, t = [], 0
    for _ in rows:
        starts.append(t)
        t += dut.steps + (rng.randint(1, 3) if rng.random() < 0.2 else 0)
    got, out_cycles, lanes_seen, lane_cycles = [], [], [], []

    async def bench(ctx):
        p_word, held_until = None, 0
        for t in range(starts[-1] + dut.latency + 2):
            i = starts.index(t) if t in starts else None
            if i is not None:
                assert ctx.get(dut.ready)
                acc, bias, m0, shift, mode = rows[i]
                ctx.set(dut.acc, acc)
                ctx.set(dut.mode, mode)
                ctx.set(dut.tag, i)
                held_until = t + 2 + 68 * (lanes - 1)
            else:       # what is on the ports between rows must not matter (acc once its last lane is read)
                if t > held_until:
                    ctx.set(dut.acc, [rng.randint(-2**31, 2**31 - 1) for _ in range(lanes)])
                ctx.set(dut.mode, rng.randint(0, 2))
                ctx.set(dut.tag, rng.randint(0, 511))
            ctx.set(dut.valid, i is not None)
            ctx.set(dut.p_data, p_word if p_word is not None else rng.getrandbits(8 * lanes))
            p_word = words[ctx.get(dut.tag_held)][ctx.get(dut.p_addr)] if ctx.get(dut.p_en) else None
            await ctx.tick()
            if ctx.get(dut.out_valid):
                # a lane at a time, in order, with the row's tag
                assert ctx.get(dut.out_lane) == len(lanes_seen)
                assert ctx.get(dut.out_tag) == len(got)
                lanes_seen.append(ctx.get(dut.out))
                lane_cycles.append(t)
                if len(lanes_seen) == lanes:
                    got.append(lanes_seen[:])
                    lanes_seen.clear()
                    out_cycles.append(t)
    simulate(dut, bench)
    assert got == _want_requant(rows)
    assert got[0][:4] == [1, 2, 0, -1]
    assert out_cycles == [t + dut.latency - 1 for t in starts]
    # lane k 70 + 68 k cycles after the row's valid
    assert lane_cycles == [t + 70 + 68 * k - 1 for t in starts for k in range(lanes)]


def test_requantizer_refuses_a_group_that_does_not_divide_the_lanes():
    with pytest.raises(ValueError, match="divisor"):
        Requantizer(4, 3)
    with pytest.raises(ValueError, match="digit_bits"):
        Requantizer(4, 1, 5)
    with pytest.raises(ValueError, match="product_latency must be 1 or 2, not 3"):
        Requantizer(4, product_latency=3)
    with pytest.raises(ValueError, match="load_copies needs a row copied first"):
        Requantizer(4, load_copies=True)
    with pytest.raises(ValueError, match="lanes must be a positive multiple of 4, not 6"):
        BitSerialRequantizer(6)


@pytest.mark.parametrize("read_latency", [1, 2, 3, 4])
def test_bufpool_banks_are_independent(read_latency):
    dut = BufferPool(16, 3, 16, read_latency=read_latency)
    rng = random.Random(4)
    model = [dict() for _ in range(3)]

    async def bench(ctx):
        # per cycle, what each bank's read returns: the word before that cycle's write (at latency 3 the
        # address and the write both registered: the memory read a cycle later, the write landing then)
        issued = []
        for cycle in range(300):
            reads = []
            for b in range(3):
                port = dut.bank[b]
                addr = rng.randrange(16)
                ctx.set(port.r_en, 1)
                ctx.set(port.r_addr, addr)
                reads.append(addr)
                en, row = rng.randrange(16), rng.randrange(4)
                data = [rng.getrandbits(16) for _ in range(4)]
                ctx.set(port.w_en, en)
                ctx.set(port.w_row, row)
                ctx.set(port.w_data, data)
                reads[b] = model[b].get(addr, 0)
                for s in range(4):
                    if en >> s & 1:
                        model[b][4 * row + s] = data[s]
            issued.append(reads)
            await ctx.tick()
            if cycle + 1 >= read_latency:
                assert [ctx.get(dut.bank[b].r_data) for b in range(3)] == issued[cycle + 1 - read_latency]
    simulate(dut, bench)
    with pytest.raises(ValueError, match="read_latency must be 1 to 4, not 5"):
        BufferPool(16, 3, 16, read_latency=5)


async def exchange(ctx, dut, words, expect, max_cycles=20000):
    out, idx = [], 0
    ctx.set(dut.o.ready, 1)
    for _ in range(max_cycles):
        if idx >= len(words) and len(out) >= expect:
            break
        ctx.set(dut.i.valid, idx < len(words))
        ctx.set(dut.i.payload, words[idx] if idx < len(words) else 0)
        took, gave, word = ctx.get(dut.i.ready) and idx < len(words), ctx.get(dut.o.valid), ctx.get(dut.o.payload)
        await ctx.tick()
        idx += bool(took)
        if gave:
            out.append(word)
    return out


def test_accelerator_runs_a_gemm_and_reports_errors():
    cfg = AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=64, acc_depth=16))
    dut = Accelerator(cfg)
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (6, 9), dtype=np.int8)
    w = rng.integers(-128, 128, (7, 9), dtype=np.int8)
    bias, m0, shift = rng.integers(-999, 999, 7), rng.integers(1 << 30, 1 << 31, 7), rng.integers(24, 30, 7)
    prog, decode = gemm_program(cfg.shape, a, w, bias, m0, shift, Mode.INT8)
    errs = Program(cfg.shape).matmul(0, 0, 0, 128, 1, 1, 1, Mode.INT8).sync()
    got = []

    async def bench(ctx):
        got.extend(await exchange(ctx, dut, errs.words + prog.words, errs.expect + prog.expect))
    simulate(dut, bench)
    assert parse_status(got[0]) == Error.BANK
    out, status = decode(got[1:])
    assert parse_status(status) == Error(0)
    acc = ref_gemm(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias.astype(np.int32)))
    assert np.array_equal(out, ref_requant(acc, torch.from_numpy(m0), torch.from_numpy(shift), 8).numpy())


def test_config_validation():
    with pytest.raises(ValueError, match="lanes"):
        AcceleratorConfig(DeviceShape(lanes=6))
    with pytest.raises(ValueError, match="banks"):
        AcceleratorConfig(DeviceShape(banks=2))
    with pytest.raises(ValueError, match="bank_words"):
        AcceleratorConfig(DeviceShape(bank_words=100))
    with pytest.raises(ValueError, match="requant_lanes must divide lanes"):
        AcceleratorConfig(DeviceShape(lanes=12), Implementation(requant_lanes=5))
    with pytest.raises(ValueError, match="requant_lanes"):
        AcceleratorConfig(DeviceShape(), Implementation(requant_lanes=0))
    with pytest.raises(ValueError, match="serial_mul_bits must be 1, 4, 8, 16 or None, not 5"):
        AcceleratorConfig(DeviceShape(), Implementation(serial_mul_bits=5))
    with pytest.raises(ValueError, match="serial_mul_bits=1 .* needs requant_lanes=1, not 2"):
        AcceleratorConfig(DeviceShape(lanes=4), Implementation(requant_lanes=2, serial_mul_bits=1))
    with pytest.raises(ValueError, match="pool_subbanks must be 1 or 4, not 2"):
        AcceleratorConfig(DeviceShape(), Implementation(pool_subbanks=2))
    with pytest.raises(ValueError, match="overlap must be True or False, not 0"):
        AcceleratorConfig(DeviceShape(), Implementation(overlap=0))
    with pytest.raises(ValueError, match="compact_array must be True or False, not 'yes'"):
        AcceleratorConfig(DeviceShape(), Implementation(compact_array="yes"))
    with pytest.raises(ValueError, match="pool_read_latency must be 1 to 5, not 0"):
        AcceleratorConfig(DeviceShape(), Implementation(pool_read_latency=0))
    with pytest.raises(ValueError, match="weight_write_latency must be 0, 1 or 2, not 3"):
        AcceleratorConfig(DeviceShape(), Implementation(weight_write_latency=3))
    with pytest.raises(ValueError, match="compact_array=True needs weight_write_latency=0"):
        AcceleratorConfig(DeviceShape(), Implementation(compact_array=True, weight_write_latency=1))
    with pytest.raises(ValueError, match="product_latency must be 1 or 2, not 0"):
        AcceleratorConfig(DeviceShape(), Implementation(product_latency=0))
    with pytest.raises(ValueError, match="compact_array=True needs product_latency=1"):
        AcceleratorConfig(DeviceShape(), Implementation(compact_array=True, product_latency=2))
    with pytest.raises(ValueError, match="hop_latency must be 1 or 2, not 3"):
        AcceleratorConfig(DeviceShape(), Implementation(hop_latency=3))
    with pytest.raises(ValueError, match="compact_array=True needs hop_latency=1"):
        AcceleratorConfig(DeviceShape(), Implementation(compact_array=True, hop_latency=2))
    with pytest.raises(ValueError, match="subbanks must be 1 or 4, not 2"):
        BufferPool(32, 3, 64, subbanks=2)
    # one memory a bank writes a row's up to 4 words one a cycle: a requantizer taking a row a cycle cannot
    with pytest.raises(ValueError, match="requantizer must take >= 4 cycles a row, not 1"):
        Accelerator(AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=64, acc_depth=16),
                                      Implementation(pool_subbanks=1))).elaborate(None)
    with pytest.raises(TypeError):
        Accelerator(config={"lanes": 4})


def test_payload_layouts():
    cfg = AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=64, acc_depth=16))
    a = np.arange(2 * 6, dtype=np.int8).reshape(2, 6)
    packed = cfg.shape.pack_activations(a)             # 2 k-tiles x 2 rows, padded to 8 columns
    assert packed.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [4, 5, 0, 0], [10, 11, 0, 0]]
    w = np.arange(5 * 3, dtype=np.int8).reshape(5, 3)
    pw = cfg.shape.pack_weights(w)                     # n-tile 0 then 1; each 4 rows: row i = W[n0 + j, i]
    assert pw[0].tolist() == [0, 3, 6, 9] and pw[1].tolist() == [1, 4, 7, 10] and pw[3].tolist() == [0, 0, 0, 0]
    assert pw[4].tolist() == [12, 0, 0, 0]
    pp = cfg.shape.pack_params([-1, 2], [5, 1 << 30], [3, 62])
    assert pp.shape == (9, 4)
    assert pp[:4].view(np.int32).ravel().tolist() == [-1, 2, 0, 0]
    assert pp[4:8].view(np.uint32).ravel().tolist() == [5, 1 << 30, 0, 0]
    assert pp[8].view(np.uint8).tolist() == [3, 62, 0, 0]
    host = cfg.shape.words_to_host(packed)
    assert np.array_equal(cfg.shape.words_from_host(host), packed)
