#!/usr/bin/env python3
"""Array efficiency of the 16x16 accelerator on the GEMMs of MiniLM and bert-base at sequence 128.

Each GEMM runs on the Verilated top (C++ clock loop) with random int8 data, its result checked `==`
against ref_gemm + ref_requant. The device's own counters give the cycles the MATMUL engine was busy;
efficiency = useful MACs / (rows * cols * busy cycles). Total cycles also count moving the operands over
the 32-bit host stream. Last line:

    array_efficiency: min=... mean=...      (over the projection and FFN GEMMs, the "large" ones)
"""

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ = 128
MODELS = {"MiniLM": dict(hidden=384, ffn=1536, heads=12), "bert-base": dict(hidden=768, ffn=3072, heads=12)}


def gemms(hidden, ffn, heads):
    d = hidden // heads
    return [("Q/K/V/O", SEQ, hidden, hidden, True), ("FFN1", SEQ, hidden, ffn, True),
            ("FFN2", SEQ, ffn, hidden, True), ("QK^T (1 head)", SEQ, d, SEQ, False),
            ("P.V (1 head)", SEQ, SEQ, d, False)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lanes", type=int, default=16)
    args = p.parse_args()

    import numpy as np
    from ambert.hw.config import AcceleratorConfig
    from ambert.proto.isa import DeviceShape
    from ambert.report.sections import run_random_gemm
    from ambert.sim.fastsim import FastSim

    cfg = AcceleratorConfig(DeviceShape(lanes=args.lanes, banks=4, bank_words=16384, acc_depth=512))
    t0 = time.perf_counter()
    sim = FastSim(cfg)
    print(f"Verilated {cfg.shape.lanes}x{cfg.shape.lanes} top ready in {time.perf_counter() - t0:.1f} s "
          f"({cfg.shape.banks} banks x {cfg.shape.bank_words} words of {cfg.shape.lanes} bytes)")
    rng = np.random.default_rng(0)
    small, large = [], []
    print(f"\n{'model':10} {'GEMM':14} {'M x K x N':>16} {'busy cycles':>12} {'total cycles':>13} "
          f"{'efficiency':>10} {'Mcycles/s':>9}")
    for model, shape in MODELS.items():
        for name, m, k, n, is_large in gemms(**shape):
            t1 = time.perf_counter()
            busy, total = run_random_gemm(sim, cfg.shape, m, k, n, rng)
            wall = time.perf_counter() - t1
            eff = m * k * n / (cfg.shape.lanes * cfg.shape.lanes * busy)
            (large if is_large else small).append(eff)
            print(f"{model:10} {name:14} {f'{m}x{k}x{n}':>16} {busy:12d} {total:13d} {eff:10.2%} "
                  f"{total / wall / 1e6:9.2f}")
    print(f"\nall results == ref_gemm + ref_requant. machine: {platform.machine()}, {platform.node()}; "
          f"attention GEMMs: min {min(small):.2%}")
    print(f"array_efficiency: min={min(large):.4f} mean={sum(large) / len(large):.4f}")


if __name__ == "__main__":
    main()
