#!/usr/bin/env python3
"""Speed of the simulated device (Verilated top, C++ clock loop, ctypes): cycles per second on one core,
I/O included, running a 128x384x384 GEMM program (loads, MATMUL, store) on 8x8 and 16x16 arrays.

Last line:  sim_speed: 8x8=<cycles/s> 16x16=<cycles/s>
"""

import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import numpy as np
    from ambert.hw.config import AcceleratorConfig
    from ambert.proto.isa import DeviceShape, Mode
    from ambert.sim.fastsim import FastSim
    from ambert.sw.compiler.gemm import gemm_program

    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (128, 384), dtype=np.int8)
    w = rng.integers(-128, 128, (384, 384), dtype=np.int8)
    speeds = {}
    print(f"{'array':>6} {'cycles':>10} {'wall s':>8} {'cycles/s':>12}")
    for lanes in (8, 16):
        cfg = AcceleratorConfig(DeviceShape(lanes=lanes, banks=4, bank_words=16384, acc_depth=512))
        sim = FastSim(cfg)
        prog, _ = gemm_program(cfg.shape, a, w, np.zeros(384), np.full(384, 1 << 30), np.full(384, 40), Mode.INT8)
        sim.run(prog.words, prog.expect)                    # warm up (page in the model)
        best = None
        for _ in range(7):
            t0 = time.perf_counter()
            res = sim.run(prog.words, prog.expect)
            dt = time.perf_counter() - t0
            best = dt if best is None or dt < best else best
        speeds[lanes] = res.cycles / best
        print(f"{lanes}x{lanes:<4} {res.cycles:10d} {best:8.3f} {speeds[lanes]:12,.0f}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, one thread")
    print(f"sim_speed: 8x8={speeds[8]:.0f} 16x16={speeds[16]:.0f}")


if __name__ == "__main__":
    main()
