"""cocotb + Verilator benches on the generated Verilog of each block (tests/benches/<block>_tb.py)."""

import dataclasses
from pathlib import Path

import pytest

from ambert.hw.array import SystolicArray
from ambert.hw.bufpool import BufferPool
from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import DeviceShape
from ambert.hw.pe import ProcessingElement
from ambert.hw.requant import Requantizer
from ambert.hw.sequencer import Sequencer
from ambert.hw.top import Accelerator
from ambert.sim.cocotb_runner import run_bench as _run_bench

BENCHES = Path(__file__).parent / "benches"


def run_bench(component, toplevel, bench, params, name):
    return _run_bench(component, toplevel, bench, params, name, BENCHES)


def check(result):
    tests, failures = result
    assert tests > 0 and failures == [], failures


def test_pe():
    check(run_bench(ProcessingElement(), "pe", "pe_tb", {}, "pe"))


@pytest.mark.parametrize("rows, cols", [(2, 2), (3, 5), (4, 4), (8, 8), (16, 16)])
def test_array(rows, cols):
    check(run_bench(SystolicArray(rows, cols), "systolic_array", "array_tb", dict(rows=rows, cols=cols),
                    f"array_{rows}x{cols}"))


@pytest.mark.parametrize("lanes", [4, 16])
def test_requant(lanes):
    check(run_bench(Requantizer(lanes), "requant", "requant_tb", dict(lanes=lanes), f"requant_{lanes}"))


def test_bufpool():
    check(run_bench(BufferPool(32, 3, 64), "bufpool", "bufpool_tb", dict(banks=3, words=64, bits=32), "bufpool"))


def test_sequencer():
    cfg = AcceleratorConfig(DeviceShape(lanes=8, banks=4, bank_words=256, acc_depth=32))
    params = dataclasses.asdict(cfg.shape)
    check(run_bench(Sequencer(cfg), "sequencer", "sequencer_tb", params, "sequencer"))


@pytest.mark.parametrize("lanes", [4, 8])
def test_top(lanes):
    cfg = AcceleratorConfig(DeviceShape(lanes=lanes, banks=4, bank_words=256, acc_depth=32))
    params = dataclasses.asdict(cfg.shape)
    check(run_bench(Accelerator(cfg), "top", "top_tb", params, f"top_{lanes}"))
