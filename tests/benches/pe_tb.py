"""cocotb bench: one processing element against the contract's GEMM (a 1x1x1 ref_gemm with a bias)."""

import random

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from ambert.sw.quant.ref import ref_gemm


def golden(psum, a, w):
    return int(ref_gemm(torch.tensor([[a]], dtype=torch.int8), torch.tensor([[w]], dtype=torch.int8),
                        torch.tensor([psum], dtype=torch.int32))[0, 0])


@cocotb.test()
async def mac_and_forward(dut):
    """psum_out = psum_in + the product of the activation and weight presented the cycle before."""
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 0
    rng = random.Random(1)
    weights = [0, 0]
    prev = None
    for step in range(400):
        a, psum, sel = rng.randint(-128, 127), rng.randint(-2**30, 2**30), rng.randint(0, 1)
        if step < 4:            # the extreme activations
            a = rng.choice([-128, 127])
        if prev is not None and step < 8:
            # land the sum on the edges of int32
            p = prev[0] * prev[1]
            psum = 2**31 - 1 - p if p >= 0 else -2**31 - p
        we, bank, wd = rng.random() < 0.3, rng.randint(0, 1), rng.choice([-128, 127, rng.randint(-128, 127)])
        dut.a_in.value, dut.psum_in.value, dut.sel_in.value = a, psum, sel
        dut.w_we.value, dut.w_bank.value, dut.w_data.value = we, bank, wd
        await RisingEdge(dut.clk)
        await ReadOnly()
        if prev is not None:
            assert dut.psum_out.value.to_signed() == golden(psum, *prev), step
        assert dut.a_out.value.to_signed() == a and int(dut.sel_out.value) == sel
        prev = (a, weights[sel])
        if we:
            weights[bank] = wd
        await FallingEdge(dut.clk)      # leave the read-only phase before driving again
