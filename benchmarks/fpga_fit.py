#!/usr/bin/env python3
"""FPGA fit: build each board's target configuration (``python -m ambert.boards.build <board> --size target``)
and tabulate resources, Fmax and peak throughput. Slow: place and route of a full array takes tens of
minutes on two cores.

    python benchmarks/fpga_fit.py [--boards ulx3s icebreaker] [--size target]

Last line:  fpga: <board> <rows>x<cols> <Fmax MHz> <GOPS> <pass|fail> ; ...
"""

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    from ambert.boards import BOARD_NAMES, get_board
    from ambert.boards.build import build, print_report
    p = argparse.ArgumentParser()
    p.add_argument("--boards", nargs="+", default=list(BOARD_NAMES))
    p.add_argument("--size", default="target")
    args = p.parse_args()
    rows = []
    for name in args.boards:
        report = build(name, args.size)
        print_report(report)
        board = get_board(name)
        config = board.config(args.size)
        fmax = min((f["achieved"] for f in report.get("fmax_mhz", {}).values()), default=0.0)
        rows.append((name, config.shape.lanes, board.clock(args.size) / 1e6, fmax, report["status"],
                     sum(report["steps"].values())))
    print(f"\n{'board':<12} {'array':>6} {'clock MHz':>10} {'Fmax MHz':>9} {'GOPS@clock':>11} {'build s':>8}  status")
    for name, lanes, clock, fmax, status, secs in rows:
        gops = 2 * lanes * lanes * clock / 1e3
        print(f"{name:<12} {lanes:>2}x{lanes:<3} {clock:>10.1f} {fmax:>9.2f} {gops:>11.2f} {secs:>8.0f}  {status}")
    print(f"machine: {platform.machine()}, {sys.platform}; YoWASP tools from PyPI")
    print("fpga: " + " ; ".join(f"{n} {l}x{l} {f:.1f} {2 * l * l * c / 1e3:.2f} {'pass' if s == 'pass' else 'fail'}"
                                for n, l, c, f, s, _ in rows))


if __name__ == "__main__":
    main()
