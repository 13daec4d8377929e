#!/usr/bin/env python3
"""``ambert serve`` under load, on loopback, against what a user would deploy instead.

Closed-loop clients (1, 8 and 32 at once, each sending one sentence per request and the next as soon as
the answer comes) for a fixed time against three servers, one after another, on this machine: ambert on
the cpu device serving two models (the bundled MiniLM and a variant of it, requests alternating); the
Hugging Face FP32 MiniLM one request at a time (a naive deployment: ``--max-batch 1``); and the FP32
model behind the same batching. Each row: sentences/s, p50 and p99 latency, the server's peak RSS and
PSS. A second table: the PSS of 1, 2 and 4 worker processes, and how much of it the mapped weights are
(their pages counted once however many workers map them). Last line:

    serve: throughput_ratio=<ambert/naive FP32 at 32 clients> p99_ms=<ambert at 32> pss_per_extra_worker=<fraction of weight bytes>

    python benchmarks/serve.py [--seconds S]

The clients run in this process (threads, keep-alive connections) on the same cores as the server: the
figures are what one machine gives, clients included.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ambert.report.measure import ServeProcess, percentile as pct, tree_memory as memory

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="load time per row (default: 8)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ambert.sw.quant import artifact
    from ambert.sw.quant.hf import bundled_model_dir
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.report.sections import resident_weight_runs, variant_of
    from ambert.sw.runtime.pool import tensor_bytes

    sentences = read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")
    folder = str(bundled_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="ambert-serve-"))
    qm, _, _ = quantize_pretrained(progress=False)
    variant = variant_of(qm)                    # its last FFN2 changed: a second model of the same size
    paths = [artifact.save(qm, tmp / "minilm.safetensors"), artifact.save(variant, tmp / "variant.safetensors")]
    two = [("minilm", str(paths[0]), folder), ("variant", str(paths[1]), folder)]
    weight_bytes = tensor_bytes(artifact.read_header(paths[0]))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; loopback; {args.seconds:.0f} s a row; "
          f"clients in this process")

    contenders = [("ambert cpu, 2 models", two, [], False),
                  ("FP32 one at a time", two[:1], ["--max-batch", "1"], True),
                  ("FP32 batched", two[:1], [], True)]
    rows = {}
    print(f"\n{'server':22} {'clients':>7} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>13} "
          f"{'PSS MiB':>8}")
    for label, models, extra, fp32 in contenders:
        with ServeProcess(models, *extra, fp32=fp32) as server:
            for clients in (1, 8, 32):
                rate, lat = server.load([m[0] for m in models], sentences, clients, args.seconds)
                peak, pss, _ = memory(server.pid, paths[0])
                rows[label, clients] = (rate, pct(lat, 0.5), pct(lat, 0.99))
                print(f"{label:22} {clients:7} {rate:8.1f} {pct(lat, 0.5) * 1e3:8.1f} {pct(lat, 0.99) * 1e3:8.1f} "
                      f"{peak:13.0f} {pss:8.0f}", flush=True)

    print(f"\nworkers (ambert cpu, one model; weights {weight_bytes / 2**20:.1f} MiB)")
    print(f"{'workers':>7} {'PSS MiB':>8} {'weights PSS MiB':>16}")
    weights_pss = {}
    for workers in (1, 2, 4):
        with ServeProcess(two[:1], "--workers", str(workers)) as server:
            server.load(["minilm"], sentences, 4 * workers, 2.0)       # every worker has run the model
            _, pss, weights = memory(server.pid, paths[0])
            weights_pss[workers] = weights
            print(f"{workers:7} {pss:8.0f} {weights:16.1f}", flush=True)
    from ambert.sw.quant.hf import load_bert, load_tokenizer
    text = " ".join(sentences[:12])
    enc = dict(load_tokenizer()([text], padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
    runs, shape = resident_weight_runs(qm, variant, load_bert().config, enc)
    print(f"\nhost link per request with weights resident in the device's pool (sim {shape.lanes}x{shape.lanes}, "
          f"one 128-token sentence, every answer == the reference)")
    print(f"{'call':28} {'host-link words':>16} {'vs first':>9} {'device cycles':>14}")
    for label, words, cycles in runs:
        print(f"{label:28} {words:16,} {words / runs[0][1] - 1:9.1%} {cycles:14,}")

    ratio = rows["ambert cpu, 2 models", 32][0] / rows["FP32 one at a time", 32][0]
    # PSS is counted in whole KiB per process: a weights' share below that rounds either way
    per_extra = max(0.0, (weights_pss[4] - weights_pss[1]) / 3 * 2**20 / weight_bytes)
    print(f"serve: throughput_ratio={ratio:.2f} p99_ms={rows['ambert cpu, 2 models', 32][2] * 1e3:.1f} "
          f"pss_per_extra_worker={per_extra:.3f}")


if __name__ == "__main__":
    sys.exit(main())
