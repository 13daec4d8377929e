#!/usr/bin/env python3
"""Data, tensor and pipeline parallelism over 1, 2 and 4 simulated 16x16 accelerators, modeled from the
devices' own cycle counters.

Every run goes through ``ambert.sw.parallel.launch`` (torch.distributed, gloo, one process a rank, each
with its own Verilated device) and is checked `==` the single-device integer reference. From each rank's
counted cycles:

* data (the bundled MiniLM, batch 8): the slowest rank's cycles, plus gathering the outputs;
* tensor (MiniLM, batch 1): the slowest rank's cycles plus two all-reduces a layer of the [T, C] int32
  partial sums (a ring: 2 (p - 1) / p of the bytes over each link);
* pipeline (a 12-layer model of MiniLM's shape — its six layers twice; the contract does not care whose
  weights — and the bundled 6-layer MiniLM; 16 micro-batches of one sentence): the GPipe schedule
  replayed from each stage's per-micro-batch cycles and the sends between stages, against the bound
  that stage balance and the bubble allow: (m + p - 1) x the slowest stage's mean micro-batch time.

Inter-device traffic is modeled at ``--link-gbps`` (default 1 GB/s, a board interconnect) and also at a
3 Mbaud host UART. Latency and throughput are at 100 MHz. Wall time on this machine is printed too: the
ranks share its cores, so it says little about the devices. Last line:

    parallel: data_x4=<x> tensor_x4=<x> pipeline_x4=<x, 12 layers> bubble_err=<|measured/bound - 1|, worst case>

    python benchmarks/parallel.py [--seq 128] [--micro-batches 16] [--modes data,tensor,pipeline]
"""

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_HZ = 100e6
UART_BYTES_S = 3e6 / 10          # 8N1

from ambert.report import measure  # noqa: E402
from ambert.report.measure import gpipe_makespan  # noqa: E402


def link_cycles(nbytes, bytes_per_s):
    return measure.link_cycles(nbytes, bytes_per_s, CLOCK_HZ)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--link-gbps", type=float, default=1.0, help="inter-device link, GB/s (default 1)")
    ap.add_argument("--modes", default="data,tensor,pipeline", help="which modes to run (default: all three)")
    args = ap.parse_args()
    modes = set(args.modes.split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ambert.report.sections import launch_checked
    from ambert.sw.quant import artifact
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences

    link = args.link_gbps * 1e9
    qm, _, tok = quantize_pretrained(progress=False)
    deep = dataclasses.replace(qm, layers=qm.layers + copy.deepcopy(qm.layers), config={**qm.config, "layers": 12})
    tmp = Path(tempfile.mkdtemp(prefix="ambert-parallel-"))
    paths = {"minilm": artifact.save(qm, tmp / "minilm.safetensors"),
             "12 layers": artifact.save(deep, tmp / "deep.safetensors")}
    models = {"minilm": qm, "12 layers": deep}
    text = " ".join(read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")[:12])

    def batch(n):
        return dict(tok([text] * n, padding="max_length", max_length=args.seq, truncation=True,
                        return_tensors="pt"))

    c = qm.config["hidden"]
    print(f"machine: {os.cpu_count()} cores; simulated 16x16 devices at {CLOCK_HZ / 1e6:.0f} MHz; sequence "
          f"{args.seq}; links {args.link_gbps:g} GB/s and a 3 Mbaud UART")
    print(f"\n{'mode':28} {'ranks':>5} {'critical cycles':>16} {'link cycles':>12} {'ms @100MHz':>11} "
          f"{'speedup':>8} {'UART ms':>9} {'wall s':>7}")
    speedups, bubble_errs = {}, []

    def row(label, ranks, critical, link_c, uart_c, base, wall, throughput=False):
        total = critical + link_c
        speed = base / total
        speedups[label, ranks] = speed
        print(f"{label:28} {ranks:5} {critical:16,.0f} {link_c:12,.0f} {total / CLOCK_HZ * 1e3:11.2f} "
              f"{speed:7.2f}{'t' if throughput else 'x'} {(critical + uart_c) / CLOCK_HZ * 1e3:9.1f} {wall:7.1f}",
              flush=True)

    def run(mode, name, enc, ranks, **kw):
        return launch_checked(mode, paths[name], models[name], enc, ranks, **kw)

    # data parallel: batch 8
    enc = batch(8)
    base = None
    for ranks in (1, 2, 4) if "data" in modes else ():
        result, wall = run("data", "minilm", enc, ranks)
        out_bytes = 8 * args.seq * c * 2 * (ranks - 1) / ranks          # the outputs gathered to one place
        critical = max(result.cycles)
        base = base or critical
        row("data, MiniLM, batch 8", ranks, critical, link_cycles(out_bytes, link), link_cycles(out_bytes, UART_BYTES_S),
            base, wall, throughput=True)

    # tensor parallel: batch 1
    enc = batch(1)
    base = None
    for ranks in (1, 2, 4) if "tensor" in modes else ():
        result, wall = run("tensor", "minilm", enc, ranks)
        reduce_bytes = 2 * len(qm.layers) * args.seq * c * 4 * 2 * (ranks - 1) / ranks
        critical = max(result.cycles)
        base = base or critical
        row("tensor, MiniLM, batch 1", ranks, critical, link_cycles(reduce_bytes, link),
            link_cycles(reduce_bytes, UART_BYTES_S), base, wall)

    # pipeline: micro-batches of one sentence
    m = args.micro_batches
    enc = batch(m)
    for name in ("12 layers", "minilm") if "pipeline" in modes else ():
        base = None
        for ranks in (1, 2, 4):
            result, wall = run("pipeline", name, enc, ranks, micro_batches=m)
            send = link_cycles(args.seq * c * 3, link)           # int8 + int16 hidden state per micro-batch
            makespan = gpipe_makespan(result.micro_cycles, send if ranks > 1 else 0.0)
            slowest = max(sum(s) / len(s) for s in result.micro_cycles)
            bound = (m + ranks - 1) * (slowest + (send if ranks > 1 else 0.0))
            bubble_errs.append(abs(makespan / bound - 1))
            base = base or makespan
            label = f"pipeline, {name}, m={m}"
            row(label, ranks, makespan, 0.0, (m * (ranks - 1) * args.seq * c * 3) / UART_BYTES_S * CLOCK_HZ,
                base, wall, throughput=True)
            print(f"{'':28} {'':5} bound {bound:,.0f} cycles (bubble {(ranks - 1) / (m + ranks - 1):.1%}); "
                  f"replayed/bound {makespan / bound:.3f}", flush=True)

    print("\n(x: latency speedup over one device; t: throughput speedup; link cycles: modeled traffic at "
          f"{args.link_gbps:g} GB/s; the pipeline's sends are inside its replayed schedule)")
    figures = [("data_x4", ("data, MiniLM, batch 8", 4)), ("tensor_x4", ("tensor, MiniLM, batch 1", 4)),
               ("pipeline_x4", (f"pipeline, 12 layers, m={m}", 4))]
    line = " ".join(f"{name}={speedups[key]:.2f}" for name, key in figures if key in speedups)
    print(f"parallel: {line}" + (f" bubble_err={max(bubble_errs):.3f}" if bubble_errs else ""))


if __name__ == "__main__":
    sys.exit(main())
