"""The sequencer on its own, in Amaranth's simulator, against a model of the instruction set
(``ref_sequence``, docs/isa.md): the pool words it writes, the answers it sends and the MATMULs it
hands to the engine, compared with `==` over a table of programs, good and bad, with idle cycles on its
input and backpressure on its output."""

import itertools
from collections import deque

import numpy as np
import pytest

from ambert.hw.config import AcceleratorConfig, Implementation
from ambert.hw.sequencer import Sequencer
from ambert.proto.isa import (ARG_WORDS, HEADER, ISA_VERSION, MODE_MASK, MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, STATUS,
                              STATUS_MAGIC, TILES, Chain, Counters, DeviceShape, Error, Info, Mode, Opcode, Program,
                              header)
from conftest import simulate

SHAPE = DeviceShape(lanes=8, banks=4, bank_words=64, acc_depth=16)
COUNTERS = Counters(busy=0x1_2345_6789, stalled=0xABCD, macs=0xFEDC_BA98_7654_3210)
MATMUL_CYCLES = 9           # the model engine's time from mm_start to mm_done

IMPLEMENTATIONS = {
    "overlap": Implementation(),
    "overlap-rl5": Implementation(pool_read_latency=5, product_latency=2),
    "one-at-a-time-serial": Implementation(requant_lanes=1, serial_mul_bits=1, pool_subbanks=1, overlap=False,
                                           compact_array=True),
}


def ref_sequence(shape, words, counters=COUNTERS):
    """What the instruction set says ``words`` do: (pool writes as {word address: value}, answer words,
    MATMULs dispatched as (a, w, p, o, m, k_tiles, n_tiles, mode, continue, hold) tuples)."""
    addr_bits = (shape.pool_words - 1).bit_length()
    bank_bits = (shape.bank_words - 1).bit_length()
    h = shape.host_words_per_pool_word
    pool, answers, matmuls, err = {}, [], [], Error(0)
    held = None             # the M whose sums the last MATMUL decoded HOLDs, if it ran and held
    words = deque(words)

    def take(n):
        return [words.popleft() if words else 0 for _ in range(n)]

    def inside(addr, extent):
        return (addr < shape.pool_words and extent < 1 << (bank_bits + 1)
                and addr % shape.bank_words + extent <= shape.bank_words)

    while words:
        head = HEADER.unpack(words.popleft())
        op, flags, count = head["opcode"], head["flags"], head["count"]
        if op not in set(Opcode):
            err |= Error.OPCODE
            continue
        args = take(ARG_WORDS[Opcode(op)])
        if op in (Opcode.LOAD, Opcode.STORE):
            addr = args[0]
            fits = addr < shape.pool_words and addr + count <= shape.pool_words
            if not fits:
                err |= Error.ADDRESS
            if op == Opcode.LOAD:
                for k in range(count):
                    value = sum(w << 32 * j for j, w in enumerate(take(h)))
                    if fits:
                        pool[addr + k] = value
            elif fits:
                for k in range(count):
                    value = pool.get(addr + k, 0)
                    answers += [value >> 32 * j & 0xFFFFFFFF for j in range(h)]
        elif op == Opcode.MATMUL:
            addrs = [x & ((1 << addr_bits) - 1) for x in args[:4]]
            fit = [x >> addr_bits == 0 for x in args[:4]]
            m, tiles, mode = args[4] & 0xFFFF, TILES.unpack(args[5]), flags & MODE_MASK
            kt, nt = tiles["k_tiles"], tiles["n_tiles"]
            cont, hold = bool(flags & Chain.CONTINUE), bool(flags & Chain.HOLD)
            chain_ok = (not (cont or hold) or nt == 1) and (not cont or held == m)
            held = None
            extents = (m * kt, nt * kt * shape.lanes, nt * PARAM_WORDS_PER_LANE_GROUP,
                       nt * m * MODE_WORDS.get(mode, 4))
            banks = [x >> bank_bits for x in addrs]
            a, w, p, o = banks
            if not (mode <= Mode.INT32 and flags < 16 and 0 < m <= shape.acc_depth and kt and nt and chain_ok):
                err |= Error.SHAPE
            elif not (all(f and inside(x, e) for f, x, e in zip(fit, addrs, extents)) and addrs[3] % 4 == 0):
                err |= Error.ADDRESS
            elif a in (w, p) or o in (a, w, p):
                err |= Error.BANK
            else:
                matmuls.append((*addrs, m, kt, nt, mode, int(cont), int(hold)))
                held = m if hold else None
        elif op == Opcode.SYNC:
            answers.append(STATUS.pack(errors=err, magic=STATUS_MAGIC))
            err = Error(0)
        elif op == Opcode.COUNTERS:
            answers += counters.pack()
        elif op == Opcode.INFO:
            answers += Info(ISA_VERSION, shape).pack()
    return pool, answers, matmuls


def rtl_sequence(config, words, send=(1,), take=(1,), counters=COUNTERS, max_cycles=20_000):
    """The same, from the sequencer: ``send`` and ``take`` are the patterns of the input's valid and the
    output's ready; the pool is a model with the configuration's read latency, the engine one that
    answers each ``mm_start`` with ``mm_done`` ``MATMUL_CYCLES`` later."""
    shape = config.shape
    dut = Sequencer(config)
    pool, answers, matmuls, expect = {}, [], [], len(ref_sequence(shape, words, counters)[1])

    async def bench(ctx):
        for name, value in zip(Counters._fields, counters):
            ctx.set(getattr(dut, f"cnt_{name}"), value)
        pending, sends, takes = deque(words), itertools.cycle(send), itertools.cycle(take)
        reads = deque([0] * config.impl.pool_read_latency)
        done_in, quiet = None, 0
        for _ in range(max_cycles):
            ctx.set(dut.rd_data, reads.popleft())
            ctx.set(dut.mm_done, done_in == 0)
            valid = bool(pending) and next(sends)
            ctx.set(dut.i.valid, valid)
            ctx.set(dut.i.payload, pending[0] if pending else 0)
            ready = next(takes)
            ctx.set(dut.o.ready, ready)
            if valid and ctx.get(dut.i.ready):
                pending.popleft()
            if ready and ctx.get(dut.o.valid):
                answers.append(ctx.get(dut.o.payload))
            reads.append(pool.get(ctx.get(dut.rd_addr), 0) if ctx.get(dut.rd_en) else 0)
            if ctx.get(dut.wr_en):
                pool[ctx.get(dut.wr_addr)] = ctx.get(dut.wr_data)
            if ctx.get(dut.mm_start):
                assert done_in is None, "a MATMUL started while one runs"
                matmuls.append(tuple(ctx.get(s) for s in (dut.mm_a, dut.mm_w, dut.mm_p, dut.mm_o, dut.mm_m,
                                                        dut.mm_k_tiles, dut.mm_n_tiles, dut.mm_mode,
                                                        dut.mm_continue, dut.mm_hold)))
                done_in = MATMUL_CYCLES
            elif done_in is not None:
                done_in = None if done_in == 0 else done_in - 1
            busy = ctx.get(dut.busy) or done_in is not None
            quiet = quiet + 1 if not pending and not busy and len(answers) >= expect else 0
            if quiet > 40:              # long enough for any answer still coming to show
                return
            await ctx.tick()
        raise AssertionError(f"the sequencer still had work after {max_cycles} cycles")

    simulate(dut, bench)
    return pool, answers, matmuls


def _pool_words(rng, n):
    return rng.integers(-128, 128, (n, SHAPE.lanes), dtype=np.int8)


def program_transfers(rng):
    B = SHAPE.bank_words
    return (Program(SHAPE).load(3, _pool_words(rng, 5)).load(B + 60, _pool_words(rng, 4)).store(4, 3)
            .store(B + 61, 3).sync().info().counters().load(2 * B, _pool_words(rng, 1)).store(2 * B, 1).sync()).words


def program_matmuls(rng):
    """MATMULs among the LOADs and STOREs that feed and drain them, as the compiler lays them out."""
    B = SHAPE.bank_words
    prog = Program(SHAPE).load(0, _pool_words(rng, 8)).load(B, _pool_words(rng, 16))
    prog.matmul(0, B, B + 16, 2 * B, 4, 2, 1, Mode.INT8).store(2 * B, 4)
    prog.load(3 * B, _pool_words(rng, 3)).matmul(3 * B, B, B + 40, 2 * B + 8, 3, 1, 2, Mode.INT32)
    prog.store(2 * B + 8, 24).load(8, _pool_words(rng, 2)).matmul(0, 3 * B, 3 * B + 32, B + 16, 16, 1, 1, Mode.INT16)
    # a chain over one n-tile's two runs of k-tiles
    prog.matmul(0, B, B + 32, 2 * B, 4, 1, 1, Mode.INT8, Chain.HOLD)
    prog.matmul(8, B + 8, B + 32, 2 * B, 4, 1, 1, Mode.INT8, Chain.CONTINUE).store(2 * B, 4)
    return prog.sync().words


def program_errors(rng):
    """Every error, each followed by a SYNC, and a good command after each bad one."""
    B, P = SHAPE.bank_words, SHAPE.pool_words
    prog = Program(SHAPE).sync()
    prog.words += [header(0x77)]                                       # unknown opcode
    prog.sync()
    prog.matmul(0, B, B + 20, 2 * B, 0, 1, 1, Mode.INT8).sync()        # M = 0
    prog.matmul(0, B, B + 20, 2 * B, 17, 1, 1, Mode.INT8).sync()       # M past the accumulators
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, 3).sync()                # mode 3
    prog.matmul(0, B, B + 20, 2 * B, 4, 0, 1, Mode.INT8).sync()        # no k-tiles
    prog.matmul(0, 0, B + 20, 2 * B, 4, 1, 1, Mode.INT8).sync()        # A and W share a bank
    prog.matmul(0, B, B + 20, B + 40, 4, 1, 1, Mode.INT8).sync()       # O shares W's bank
    prog.matmul(0, B, B + 20, 2 * B + 2, 4, 1, 1, Mode.INT8).sync()    # O misaligned
    prog.matmul(B - 2, B + 4, B + 30, 2 * B, 4, 1, 1, Mode.INT8).sync()  # A runs off its bank
    prog.matmul(0, B, B + 60, 2 * B, 4, 1, 1, Mode.INT8).sync()        # P runs off its bank
    prog.matmul(0, B, B + 20, 2 * B, 16, 1, 5, Mode.INT32).sync()      # O runs off its bank
    prog.matmul(0, B, B + 20, 2 * B, 1, 1 << 15, 1, Mode.INT8).sync()  # W far past a bank
    prog.matmul(1 << 31, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8).sync()  # A beyond the address width
    prog.store(P - 1, 2).sync().load(P - 1, _pool_words(rng, 2)).sync()  # STORE, LOAD past the pool
    prog.store(1 << 24, 1).load((1 << 30) + 5, _pool_words(rng, 1)).sync()
    prog.load(P, np.zeros((0, SHAPE.lanes), np.int8)).store(P - 4, 0).sync()    # empty ones
    prog.words += [header(Opcode.MATMUL, flags=0x80), 0, B, B + 20, 2 * B, 4, 1 << 16 | 1]   # unknown flag
    prog.sync()
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 2, Mode.INT8, Chain.HOLD).sync()         # a chain over 2 n-tiles
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8, Chain.CONTINUE).sync()     # nothing held
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8, Chain.HOLD)               # held for M = 4 ...
    prog.matmul(0, B, B + 20, 2 * B, 5, 1, 1, Mode.INT8, Chain.CONTINUE).sync()     # ... continued with 5
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8, Chain.HOLD)               # held ...
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8)                            # ... dropped by this
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8, Chain.CONTINUE).sync()
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, 3, Chain.HOLD)                       # a bad HOLD holds nothing
    prog.matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8, Chain.CONTINUE)
    prog.sync().load(5, _pool_words(rng, 2)).matmul(0, B, B + 20, 2 * B, 4, 1, 1, Mode.INT8).store(5, 2).sync()
    return prog.words


def program_random(rng, commands=60):
    """Random commands, most of them near the edges of what is allowed."""
    B, P = SHAPE.bank_words, SHAPE.pool_words
    prog = Program(SHAPE)
    for _ in range(commands):
        kind = rng.integers(0, 6)
        if kind == 0:
            addr = int(rng.integers(0, P + 4))
            n = int(rng.integers(0, 6))
            prog.words += [header(Opcode.LOAD, n), addr]
            prog.words += [int(x) for x in rng.integers(0, 1 << 32, n * SHAPE.host_words_per_pool_word)]
        elif kind == 1:
            prog.words += [header(Opcode.STORE, int(rng.integers(0, 6))), int(rng.integers(0, P + 4))]
        elif kind in (2, 3):
            banks = rng.permutation(SHAPE.banks)[:3] if rng.random() < 0.8 else rng.integers(0, SHAPE.banks, 3)
            a, w, o = (int(b) * B + int(rng.integers(0, B // 2)) for b in banks)
            o -= o % 4 if rng.random() < 0.9 else 0
            m, kt, nt = (int(rng.choice([0, 1, 2, 3, 4, 16, 17], p=[.05, .3, .3, .1, .1, .1, .05]))
                         for _ in range(3))
            mode = int(rng.choice([0, 1, 2, 3], p=[.4, .3, .25, .05]))
            mode |= int(rng.choice([0, Chain.HOLD, Chain.CONTINUE, Chain.HOLD | Chain.CONTINUE], p=[.6, .15, .15, .1]))
            p_addr = w + nt * kt * SHAPE.lanes - int(rng.integers(0, 3) == 0)
            prog.words += [header(Opcode.MATMUL, flags=mode), a, w, p_addr, o, m, TILES.pack(k_tiles=kt, n_tiles=nt)]
        elif kind == 4:
            prog.sync()
        else:
            prog.words += [header(int(rng.choice([Opcode.INFO, Opcode.COUNTERS, Opcode.NOP, 0x42])))]
    return prog.sync().words


PROGRAMS = {"transfers": program_transfers, "matmuls": program_matmuls, "errors": program_errors,
            "random": program_random}
PATTERNS = {"steady": ((1,), (1,)), "idle-and-backpressure": ((1, 1, 0), (1, 0, 0, 1))}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_sequencer_does_what_the_instruction_set_says(impl, program):
    config = AcceleratorConfig(SHAPE, IMPLEMENTATIONS[impl])
    words = PROGRAMS[program](np.random.default_rng(len(program)))
    want = ref_sequence(SHAPE, words)
    for send, take in PATTERNS.values():
        got = rtl_sequence(config, words, send, take)
        assert got == want, (impl, program, send, take)


def test_the_model_sees_each_error():
    """The reference's own check: the error program's SYNCs report each class as its comment says."""
    _, answers, matmuls = ref_sequence(SHAPE, program_errors(np.random.default_rng(0)))
    flags = [Error(STATUS.unpack(w)["errors"]) for w in answers if STATUS.unpack(w)["magic"] == STATUS_MAGIC]
    assert flags == [Error(0), Error.OPCODE, Error.SHAPE, Error.SHAPE, Error.SHAPE, Error.SHAPE, Error.BANK,
                     Error.BANK, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS,
                     Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error.ADDRESS, Error(0), Error.SHAPE, Error.SHAPE,
                     Error.SHAPE, Error.SHAPE, Error.SHAPE, Error.SHAPE, Error(0)]
    assert len(matmuls) == 4
