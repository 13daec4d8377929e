"""cocotb bench: the sequencer alone, with a dictionary for the pool and a stand-in for the MATMUL engine.

Checks what it writes for LOAD, what it answers for STORE/INFO/SYNC, which MATMULs it starts (with which
arguments) and which it refuses, under idle input and output backpressure.
"""

import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly

from ambert.proto.isa import ISA_VERSION, Chain, DeviceShape, Error, Info, Mode, Program, header, parse_status
from top_tb import PATTERNS, exchange

CONFIG = DeviceShape(**{k: int(os.environ[f"AMBERT_{k.upper()}"])
                        for k in ("lanes", "banks", "bank_words", "acc_depth")})


@cocotb.test()
async def decode_under_flow_control(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value, dut.i__valid.value, dut.o__ready.value, dut.mm_done.value = 0, 0, 0, 0
    pool, started = {}, []

    async def memory_and_engine():
        # drive on the falling edge, sample the settled requests before the rising edge that acts on them
        pending, busy = None, 0
        while True:
            await FallingEdge(dut.clk)
            if pending is not None:
                dut.rd_data.value = pool.get(pending, 0)      # one cycle after the read, as the pool does
            dut.mm_done.value = busy == 1
            busy = max(0, busy - 1)
            await ReadOnly()
            if int(dut.wr_en.value):
                pool[int(dut.wr_addr.value)] = int(dut.wr_data.value)
            pending = int(dut.rd_addr.value) if int(dut.rd_en.value) else None
            if int(dut.mm_start.value):
                started.append([int(getattr(dut, f"mm_{n}").value)
                                for n in ("a", "w", "p", "o", "m", "k_tiles", "n_tiles", "mode", "continue",
                                          "hold")])
                busy = 5
    cocotb.start_soon(memory_and_engine())

    rng = np.random.default_rng(0)
    B = CONFIG.bank_words
    data = rng.integers(-128, 128, (5, CONFIG.lanes), dtype=np.int8)
    prog = (Program(CONFIG).load(7, data).store(7, 5)
            .matmul(0, B, B + 64, 2 * B, 3, 2, 1, Mode.INT16).sync()          # valid: started
            .matmul(0, B, B + 64, 2 * B, 3, 2, 1, 3).sync()                   # bad mode: refused
            .matmul(B, B, B + 64, 2 * B, 3, 2, 1, Mode.INT8).sync()           # A and W share a bank
            .matmul(0, B, B + 64, 2 * B, 3, 1, 1, Mode.INT8, Chain.CONTINUE)  # nothing held: refused
            .matmul(0, B, B + 64, 2 * B, 3, 1, 1, Mode.INT8, Chain.HOLD)      # a chain: both started
            .matmul(3, B + 4, B + 64, 2 * B, 3, 1, 1, Mode.INT8, Chain.CONTINUE).sync()
            .info())
    prog.words[len(prog.words) - 1:len(prog.words) - 1] = [header(0xAB)]    # unknown opcode before INFO
    prog.sync()
    answers = await exchange(dut, prog.words, prog.expect, PATTERNS["bursty"], PATTERNS["idle"])
    h = CONFIG.host_words_per_pool_word
    stored = CONFIG.words_from_host(answers[:5 * h])
    assert np.array_equal(stored, data)
    assert all(pool[7 + i] == int.from_bytes(data[i].tobytes(), "little") for i in range(5))
    flags = [parse_status(w) for w in answers[5 * h:5 * h + 4]]
    assert flags == [Error(0), Error.SHAPE, Error.BANK, Error.SHAPE]
    assert started == [[0, B, B + 64, 2 * B, 3, 2, 1, int(Mode.INT16), 0, 0],
                       [0, B, B + 64, 2 * B, 3, 1, 1, int(Mode.INT8), 0, 1],
                       [3, B + 4, B + 64, 2 * B, 3, 1, 1, int(Mode.INT8), 1, 0]]
    assert Info.unpack(answers[5 * h + 4:5 * h + 7]) == Info(ISA_VERSION, CONFIG)
    assert parse_status(answers[-1]) == Error.OPCODE
