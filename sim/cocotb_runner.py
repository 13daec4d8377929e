"""Build an Amaranth component into a Verilator model and run a cocotb bench on it, from pytest.

Each (bench, parameter set) gets its own build folder under ``build/cocotb/``; the bench reads its
parameters from ``AMBERT_*`` environment variables. Waveforms (FST) only when ``WAVES=1``.
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .fastsim import _ZERO_MEMORY_INIT
from .verilator_env import apply as _verilator_env

__all__ = ["run_bench"]

ROOT = Path(__file__).resolve().parent.parent


def run_bench(component, toplevel, bench, params, name, bench_dir):
    """Convert ``component`` to Verilog (module ``toplevel``), build it, run the cocotb module ``bench``
    (``<bench_dir>/<bench>.py``).

    ``params`` are passed to the bench as ``AMBERT_<KEY>`` variables. Returns (tests, failures).
    """
    from amaranth.back import verilog
    from cocotb_tools.runner import get_runner

    _verilator_env()
    waves = os.environ.get("WAVES") == "1"
    build_dir = ROOT / "build" / "cocotb" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    src = build_dir / f"{toplevel}.v"
    text = _ZERO_MEMORY_INIT.sub("", verilog.convert(component, name=toplevel))
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    runner = get_runner("verilator")
    runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=build_dir, waves=waves,
                 build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-O2",
                             "--x-assign", "fast", "--x-initial", "0"] + (["--trace-fst"] if waves else []),
                 log_file=build_dir / "build.log")
    env = {f"AMBERT_{k.upper()}": str(v) for k, v in params.items()}
    # the runner hands the simulator this process's sys.path as PYTHONPATH: make the benches findable
    for path in (str(bench_dir),):
        if path not in sys.path:
            sys.path.append(path)
    results = runner.test(test_module=bench, hdl_toplevel=toplevel, build_dir=build_dir, test_dir=build_dir,
                          extra_env=env, waves=waves, log_file=build_dir / "test.log")
    tree = ET.parse(results)
    cases = tree.findall(".//testcase")
    failures = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    return len(cases), failures
