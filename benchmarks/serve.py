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
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(models, *extra, fp32=False):
    """An ``ambert serve`` process on a free loopback port, once it answers: (process, port)."""
    port = free_port()
    args = [str(Path(sys.executable).with_name("ambert")), "serve", "--port", str(port), "--device", "cpu", *extra]
    for name, path, folder in models:
        args += ["--model-artifact", f"{name}={path}:{folder}"]
    if fp32:
        args.append("--baseline-fp32")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), models[0][0], "warm up")
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.3)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)


def post(conn, model, sentence):
    conn.request("POST", "/embed", json.dumps({"inputs": [sentence], "model": model}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
    return body


def load(port, models, sentences, clients, seconds):
    """Closed-loop clients for ``seconds``: (sentences/s, sorted latencies in s)."""
    latencies, lock, stop_at = [], threading.Lock(), time.monotonic() + seconds
    errors = []

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = k
        mine = []
        while time.monotonic() < stop_at:
            t = time.monotonic()
            try:
                post(conn, models[i % len(models)], sentences[i % len(sentences)])
            except Exception as e:      # noqa: BLE001 - reported below, the run is void
                errors.append(e)
                return
            mine.append(time.monotonic() - t)
            i += clients
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return len(latencies) / (time.monotonic() - t0), sorted(latencies)


def pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def tree(pid):
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [int(c) for c in subprocess.run(["pgrep", "-P", str(p)], capture_output=True,
                                                 text=True).stdout.split()]
    return out


def memory(pid, weight_file):
    """(peak RSS MiB summed over the tree, PSS MiB summed, PSS MiB of the weight file's mappings)."""
    peak = pss = weights = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
            current = None
            for line in Path(f"/proc/{p}/smaps").read_text().splitlines():
                if "-" in line.split()[0] and len(line.split()) >= 5:
                    current = line.split()[-1] if len(line.split()) >= 6 else ""
                elif line.startswith("Pss:"):
                    kib = int(line.split()[1])
                    pss += kib
                    if current and Path(current).name in weight_file:
                        weights += kib
        except OSError:
            continue
    return peak / 1024, pss / 1024, weights / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="load time per row (default: 8)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ambert.sw.quant import artifact
    from ambert.sw.quant.hf import bundled_model_dir
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.sw.runtime.pool import tensor_bytes

    sentences = read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")
    folder = str(bundled_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="ambert-serve-"))
    qm, _, _ = quantize_pretrained(progress=False)
    layer = qm.layers[-1]
    variant = dataclasses.replace(qm, layers=[*qm.layers[:-1], dataclasses.replace(
        layer, w2=torch.flip(layer.w2, dims=[1]).contiguous())])    # a variant: its last FFN2 changed
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
        proc, port = start(models, *extra, fp32=fp32)
        try:
            for clients in (1, 8, 32):
                rate, lat = load(port, [m[0] for m in models], sentences, clients, args.seconds)
                peak, pss, _ = memory(proc.pid, str(paths[0]))
                rows[label, clients] = (rate, pct(lat, 0.5), pct(lat, 0.99))
                print(f"{label:22} {clients:7} {rate:8.1f} {pct(lat, 0.5) * 1e3:8.1f} {pct(lat, 0.99) * 1e3:8.1f} "
                      f"{peak:13.0f} {pss:8.0f}", flush=True)
        finally:
            stop(proc)

    print(f"\nworkers (ambert cpu, one model; weights {weight_bytes / 2**20:.1f} MiB)")
    print(f"{'workers':>7} {'PSS MiB':>8} {'weights PSS MiB':>16}")
    weights_pss = {}
    for workers in (1, 2, 4):
        proc, port = start(two[:1], "--workers", str(workers))
        try:
            load(port, ["minilm"], sentences, 4 * workers, 2.0)       # every worker has run the model
            _, pss, weights = memory(proc.pid, str(paths[0]))
            weights_pss[workers] = weights
            print(f"{workers:7} {pss:8.0f} {weights:16.1f}", flush=True)
        finally:
            stop(proc)
    print("host-link bytes with weights resident on the device: not built (the on-chip pool is planned per "
          "program; weights do not stay resident across calls)")

    ratio = rows["ambert cpu, 2 models", 32][0] / rows["FP32 one at a time", 32][0]
    per_extra = (weights_pss[4] - weights_pss[1]) / 3 * 2**20 / weight_bytes
    print(f"serve: throughput_ratio={ratio:.2f} p99_ms={rows['ambert cpu, 2 models', 32][2] * 1e3:.1f} "
          f"pss_per_extra_worker={per_extra:.3f}")


if __name__ == "__main__":
    sys.exit(main())
