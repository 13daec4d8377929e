"""cocotb bench: the requantization epilogue, one row per cycle with parameters changing every row.

Golden model: the contract's ref_requant of (acc + bias); the int32 bypass is acc + bias itself.
"""

import os
import random

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from bench_util import pack, unpack
from ambert.hw.requant import Requantizer
from ambert.sw.quant.ref import INT32_MAX, INT32_MIN, ref_requant

LANES = int(os.environ["AMBERT_LANES"])
LATENCY = Requantizer(LANES).latency       # the full-width datapath, as the bench builds it


def golden(acc, bias, m0, shift, mode):
    s = torch.tensor([a + b for a, b in zip(acc, bias)], dtype=torch.int32)
    if mode == 2:
        return s.tolist()
    return ref_requant(s, torch.tensor(m0), torch.tensor(shift), 8 if mode == 0 else 16).tolist()


def random_row(rng):
    acc, bias = [], []
    for _ in range(LANES):
        b = rng.randint(-2**20, 2**20)
        a = rng.choice([rng.randint(-2**16, 2**16), rng.randint(INT32_MIN - b if b < 0 else INT32_MIN,
                                                                  INT32_MAX - b if b > 0 else INT32_MAX)])
        acc.append(a)
        bias.append(b)
    m0 = [rng.choice([rng.randint(0, 2**31 - 1), 2**31 - 1, 1 << 30, 0]) for _ in range(LANES)]
    shift = [rng.choice([rng.randint(0, 62), 0, 1, 31, 62]) for _ in range(LANES)]
    return acc, bias, m0, shift, rng.randint(0, 2)


@cocotb.test()
async def rows_back_to_back(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 0
    dut.valid.value = 0
    rng = random.Random(LANES)
    rows = [random_row(rng) for _ in range(500)]
    # ties: multiplier 0.5 on odd sums
    rows[0] = ([1, 3, -1, -3] * (LANES // 4), [0] * LANES, [1 << 30] * LANES, [31] * LANES, 0)
    got = []

    async def monitor():
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            if int(dut.out_valid.value):
                got.append(unpack(int(dut.out.value), 32, LANES))
    cocotb.start_soon(monitor())
    for acc, bias, m0, shift, mode in rows:
        dut.acc.value, dut.bias.value = pack(acc, 32), pack(bias, 32)
        dut.m0.value, dut.shift.value, dut.mode.value, dut.valid.value = pack(m0, 31), pack(shift, 6), mode, 1
        await RisingEdge(dut.clk)
    dut.valid.value = 0
    for _ in range(LATENCY + 2):
        await RisingEdge(dut.clk)
    assert got == [golden(*r) for r in rows]
    assert got[0][:4] == [1, 2, 0, -1]
