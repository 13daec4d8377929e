"""cocotb bench: the whole accelerator (sequencer, engine, pool) through its host streams, with idle
cycles on the input and backpressure on the output. Golden model: ref_gemm + ref_requant."""

import itertools
import os

import cocotb
import numpy as np
import torch
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly

from ambert.proto.isa import ISA_VERSION, MODE_BITS, DeviceShape, Error, Info, Mode, Program, header, parse_status
from ambert.sw.compiler.gemm import gemm_program
from ambert.sw.quant.ref import ref_matmul

CONFIG = DeviceShape(**{k: int(os.environ[f"AMBERT_{k.upper()}"])
                        for k in ("lanes", "banks", "bank_words", "acc_depth")})
PATTERNS = {"steady": [1], "idle": [1, 1, 1, 0], "bursty": [1, 0, 0, 1, 1, 0, 1, 1, 1, 0]}


async def exchange(dut, words, expect, send, take):
    """Send ``words`` with valid following ``send``; collect ``expect`` answers, ready following ``take``."""
    got = []

    async def monitor():
        pattern = itertools.cycle(take)
        while True:
            await FallingEdge(dut.clk)
            ready = next(pattern)
            dut.o__ready.value = ready
            await ReadOnly()
            if ready and int(dut.o__valid.value):
                got.append(int(dut.o__payload.value))
    task = cocotb.start_soon(monitor())
    pattern = itertools.cycle(send)
    idx = 0
    while idx < len(words):
        await FallingEdge(dut.clk)
        valid = next(pattern)
        dut.i__valid.value, dut.i__payload.value = valid, words[idx]
        await ReadOnly()
        if valid and int(dut.i__ready.value):
            idx += 1
    await FallingEdge(dut.clk)
    dut.i__valid.value = 0
    for _ in range(200_000):
        if len(got) >= expect:
            break
        await FallingEdge(dut.clk)
    task.cancel()
    return got


def golden(a, w, bias, m0, shift, mode):
    return ref_matmul(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias.astype(np.int32)),
                      torch.from_numpy(m0), torch.from_numpy(shift), MODE_BITS[mode]).numpy()


async def reset(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.i__valid.value, dut.o__ready.value, dut.rst.value = 0, 0, 1
    for _ in range(3):
        await FallingEdge(dut.clk)
    dut.rst.value = 0


@cocotb.test()
@cocotb.parametrize(send=list(PATTERNS), take=list(PATTERNS))
async def gemm_under_flow_control(dut, send, take):
    await reset(dut)
    rng = np.random.default_rng(len(send) * 10 + len(take))
    for mode in Mode:
        m, k, n = int(rng.integers(1, 12)), int(rng.integers(1, 20)), int(rng.integers(1, 12))
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
        bias = rng.integers(-5000, 5000, n)
        m0 = rng.integers(1 << 30, 1 << 31, n)
        shift = rng.integers(28, 40, n)
        for zero_tiles in (False, True) if send == take else (False,):
            if zero_tiles:          # every other k-tile of every n-tile zero: a chain of MATMULs an n-tile
                w = w.copy()
                for k0 in range(0, k, 2 * CONFIG.lanes):
                    w[:, k0:k0 + CONFIG.lanes] = 0
            prog, decode = gemm_program(CONFIG, a, w, bias, m0, shift, mode)
            answers = await exchange(dut, prog.words, prog.expect, PATTERNS[send], PATTERNS[take])
            out, status = decode(answers)
            assert parse_status(status) == Error(0)
            assert np.array_equal(out, golden(a, w, bias, m0, shift, mode)), (mode, zero_tiles)


@cocotb.test()
async def errors_then_recovery(dut):
    await reset(dut)
    B = CONFIG.bank_words
    prog = Program(CONFIG).info()
    prog.words += [header(0x99), header(0xEE, 5)]
    prog.sync().matmul(0, 0, 0, 2 * B, 1, 1, 1, Mode.INT8).sync().sync()
    answers = await exchange(dut, prog.words, prog.expect, PATTERNS["idle"], PATTERNS["bursty"])
    assert Info.unpack(answers[:Info.WORDS]) == Info(ISA_VERSION, CONFIG)
    assert [parse_status(w) for w in answers[3:]] == [Error.OPCODE, Error.BANK, Error(0)]
