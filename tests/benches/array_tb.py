"""cocotb bench: the systolic array streaming rows back to back while the idle weight bank is reloaded.

Golden model: the contract's ref_gemm (one row against the selected bank's weights).
"""

import os
import random

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from bench_util import pack, unpack
from ambert.sw.quant.ref import ref_gemm

ROWS, COLS = int(os.environ["AMBERT_ROWS"]), int(os.environ["AMBERT_COLS"])
LATENCY = ROWS + COLS + 1          # SystolicArray.latency: the skew, and the PEs' product register


@cocotb.test()
async def tiles_back_to_back(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 0
    dut.valid.value = 0
    dut.w_we.value = 0
    rng = random.Random(ROWS * 100 + COLS)
    banks = [[[0] * COLS for _ in range(ROWS)] for _ in range(2)]

    async def load(bank, weights):
        for i in range(ROWS):
            dut.w_we.value, dut.w_bank.value, dut.w_row.value = 1, bank, i
            dut.w_data.value = pack(weights[i], 8)
            await RisingEdge(dut.clk)
        dut.w_we.value = 0

    def random_weights(extreme=False):
        pick = (lambda: rng.choice([-128, 127])) if extreme else (lambda: rng.randint(-128, 127))
        return [[pick() for _ in range(COLS)] for _ in range(ROWS)]

    got = []

    async def monitor():
        cycle = 0
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            cycle += 1
            if int(dut.out_valid.value):
                got.append((cycle, unpack(int(dut.out.value), 32, COLS)))
    cocotb.start_soon(monitor())

    tile_weights = [random_weights(extreme=t == 1) for t in range(6)]
    await load(0, tile_weights[0])
    banks[0] = tile_weights[0]
    issued = []
    for t in range(6):
        sel = t % 2
        rows = max(2 * LATENCY + ROWS, 8)
        for r in range(rows):
            a = [rng.choice([-128, 127]) if t == 1 else rng.randint(-128, 127) for _ in range(ROWS)]
            dut.a.value, dut.sel.value, dut.valid.value = pack(a, 8), sel, 1
            # reload the idle bank once the previous tile (which used it) has drained
            if t + 1 < 6 and r == LATENCY + 1:
                cocotb.start_soon(load(1 - sel, tile_weights[t + 1]))
            want = ref_gemm(torch.tensor([a], dtype=torch.int8),
                            torch.tensor(banks[sel], dtype=torch.int8).T.contiguous())[0].tolist()
            issued.append(want)
            await RisingEdge(dut.clk)
        if t + 1 < 6:
            banks[1 - sel] = tile_weights[t + 1]
    dut.valid.value = 0
    for _ in range(LATENCY + 4):
        await RisingEdge(dut.clk)
    assert [v for _, v in got] == issued
    cycles = [c for c, _ in got]
    assert cycles == list(range(cycles[0], cycles[0] + len(cycles))), "one row per cycle, no bubble"
