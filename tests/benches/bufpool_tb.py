"""cocotb bench: the buffer pool's banks, read and written every cycle, against a dictionary model."""

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

BANKS, WORDS, BITS = (int(os.environ[f"AMBERT_{k}"]) for k in ("BANKS", "WORDS", "BITS"))


@cocotb.test()
async def random_traffic(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 0
    rng = random.Random(BANKS * WORDS)
    model = [dict() for _ in range(BANKS)]
    for step in range(1500):
        writes = []
        for b in range(BANKS):
            port = lambda name: getattr(dut, f"bank__{b}__{name}")   # noqa: E731
            r_en = rng.random() < 0.7
            r_addr = rng.randrange(WORDS)
            port("r_en").value, port("r_addr").value = r_en, r_addr
            w_en = rng.randrange(16) if rng.random() < 0.6 else 0
            row = rng.randrange(WORDS // 4)
            data = [rng.getrandbits(BITS) for _ in range(4)]
            port("w_en").value, port("w_row").value = w_en, row
            port("w_data").value = sum(d << (BITS * s) for s, d in enumerate(data))
            # a read and a write of the same word in one cycle return the old word
            pending_now = (r_addr, model[b].get(r_addr, 0)) if r_en else None
            writes.append((b, w_en, row, data, pending_now))
        await RisingEdge(dut.clk)
        await ReadOnly()
        for b, w_en, row, data, pending_now in writes:
            if pending_now is not None:
                addr, value = pending_now
                assert int(getattr(dut, f"bank__{b}__r_data").value) == value, (step, b, addr)
            for s in range(4):
                if w_en >> s & 1:
                    model[b][4 * row + s] = data[s]
        await FallingEdge(dut.clk)      # leave the read-only phase before driving again
