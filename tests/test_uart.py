"""The UART PHY in Amaranth's simulator against its line model (hw.uart.line_levels)."""

import random
from fractions import Fraction

import pytest
from amaranth import Module
from amaranth.sim import Simulator

from ambert.hw.uart import UartRx, UartTx, line_levels


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("divisor", [2, 5, 16, Fraction(14, 3), Fraction(100, 3), Fraction(21, 4)])
def test_tx_sends_bytes_back_to_back_exactly_as_the_model(divisor):
    dut = UartTx(divisor)
    data = bytes(random.Random(str(divisor)).randrange(256) for _ in range(20)) + b"\x00\xff"
    levels = []
    if divisor != int(divisor):
        # the model itself at a fractional divisor: 0x55 changes level at every bit, and bit k ends
        # floor((k + 1) d) cycles after the byte's start
        one = line_levels(b"\x55", divisor)
        edges = [n for n in range(1, len(one)) if one[n] != one[n - 1]]
        assert edges == [int(k * divisor) for k in range(1, 10)] and len(one) == int(10 * divisor)

    async def bench(ctx):
        ctx.set(dut.i.valid, 1)
        sent = 0
        while len(levels) < len(line_levels(data, divisor)) + 3 * divisor:
            ctx.set(dut.i.payload, data[sent] if sent < len(data) else 0)
            ctx.set(dut.i.valid, sent < len(data))
            levels.append(ctx.get(dut.tx))
            took = ctx.get(dut.i.ready) and sent < len(data)
            await ctx.tick()
            sent += took
    _run(dut, bench)
    want = line_levels(data, divisor)
    start = levels.index(0)
    assert levels[start:start + len(want)] == want and all(levels[start + len(want):])


def _receive(divisor, levels, take_every=1):
    dut = UartRx(divisor)
    got = []

    async def bench(ctx):
        for n, level in enumerate(levels):
            ctx.set(dut.rx, level)
            ready = n % take_every == 0
            ctx.set(dut.o.ready, ready)
            if ready and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
            await ctx.tick()
        got.append((ctx.get(dut.framing_errors), ctx.get(dut.overruns)))
    _run(dut, bench)
    return bytes(got[:-1]), got[-1]


def _levels_at(data, bit_cycles, idle=7):
    """Line levels for a transmitter whose bit lasts ``bit_cycles`` receiver cycles (not an integer: a
    clock mismatch)."""
    bits = [1] * 3 + [b for byte in data for b in [0] + [(byte >> i) & 1 for i in range(8)] + [1]] + [1] * 3
    total = int(len(bits) * bit_cycles) + idle
    return [bits[min(len(bits) - 1, int(t / bit_cycles))] for t in range(total)]


@pytest.mark.parametrize("divisor, mismatch", [(4, 1.0), (8, 0.97), (8, 1.03), (16, 1.04), (16, 0.96),
                                               (Fraction(100, 3), 1.0), (Fraction(100, 3), 1.02),
                                               (Fraction(100, 3), 0.98), (Fraction(14, 3), 1.0)])
def test_rx_decodes_across_a_clock_mismatch(divisor, mismatch):
    data = bytes(random.Random(str(divisor)).randrange(256) for _ in range(40)) + b"\x7e\x7d\x00\xff"
    got, (framing, overruns) = _receive(divisor, _levels_at(data, divisor * mismatch))
    assert got == data and framing == 0 and overruns == 0


def test_rx_ignores_glitches_and_counts_framing_errors_and_overruns():
    d = 8
    glitch = [1] * 10 + [0, 0] + [1] * 20                       # shorter than half a bit
    bad_stop = line_levels(b"\x55", d)[:-d] + [0] * d + [1] * 3 * d
    good = line_levels(b"\xa5", d, idle=5) + [1] * 2 * d
    got, (framing, overruns) = _receive(d, glitch + bad_stop + good)
    assert got == b"\xa5" and framing == 1 and overruns == 0
    # a consumer that takes a byte only every 200 cycles loses the ones in between, and says so
    got, (framing, overruns) = _receive(d, line_levels(bytes(range(10)), d) + [1] * 4 * d, take_every=200)
    assert overruns > 0 and len(got) < 10


@pytest.mark.parametrize("d", [6, Fraction(100, 3)])
def test_loopback_through_both(d):
    data = bytes(random.Random(1).randrange(256) for _ in range(64))
    m = Module()
    m.submodules.tx = tx = UartTx(d)
    m.submodules.rx = rx = UartRx(d)
    m.d.comb += rx.rx.eq(tx.tx)
    got = []

    async def bench(ctx):
        sent = 0
        ctx.set(rx.o.ready, 1)
        for _ in range(int(len(data) * 10 * d) + 50):
            ctx.set(tx.i.valid, sent < len(data))
            ctx.set(tx.i.payload, data[sent] if sent < len(data) else 0)
            if ctx.get(rx.o.valid):
                got.append(ctx.get(rx.o.payload))
            took = ctx.get(tx.i.ready) and sent < len(data)
            await ctx.tick()
            sent += took
    _run(m, bench)
    assert bytes(got) == data
