#!/usr/bin/env python3
"""The CPU backend against what a CPU user would pick instead, on the bundled all-MiniLM-L6-v2.

Hugging Face FP32, torch's dynamic int8 (``quantize_dynamic`` of every Linear) and ambert's ``cpu``
device (the integer reference behind the runtime, as ``--device cpu`` runs it), at sequence 128, batch 1
and 32, each the best of interleaved runs in one process (so a machine whose speed drifts hits all three
alike); the CPU model and its int8 features printed; each one's mean cosine to FP32 on the evaluation
sentences. Last line:

    cpu_speed: b1_ratio=<ambert/fp32> b32_ratio=<ambert/fp32> dyn_b32_ratio=<dynamic int8/fp32>

    python benchmarks/cpu_speed.py [--reps N]
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_description():
    """The CPU's model name and which of its features int8 kernels use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine()):
                model = value.strip()
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    have = [f for f in INT8_FEATURES if f in flags]
    return f"{model}; int8 features: {', '.join(have) or 'none of ' + ', '.join(INT8_FEATURES)}"


def best_of_interleaved(fns, reps):
    """Best wall time of each function, the runs interleaved."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved runs at batch 32 (4x that at batch 1)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ambert.sw.quant.hf import encode, mean_pool
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.sw.runtime import offload

    qm, model, tok = quantize_pretrained(progress=False)
    model.eval()
    dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    ambert_cpu = offload(model, device="cpu", quantized=qm)
    contenders = {"Hugging Face FP32": model, "torch dynamic int8": dynamic, "ambert cpu": ambert_cpu}
    sentences = read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")

    print(f"machine: {cpu_description()}; {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads")
    results = {}
    with torch.no_grad():
        for batch, reps in ((1, 4 * args.reps), (32, args.reps)):
            enc = tok((sentences * 2)[:batch], padding="max_length", max_length=128, truncation=True,
                      return_tensors="pt")
            for m in contenders.values():
                m(**enc)                        # warm up: first-call allocations, lazy initialisation
            times = best_of_interleaved([lambda m=m: m(**enc) for m in contenders.values()], reps)
            results[batch] = dict(zip(contenders, times))
        enc = encode(tok, sentences)
        fp32 = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        cosine = {name: float((mean_pool(m(**enc).last_hidden_state, enc["attention_mask"]) * fp32)
                              .sum(dim=-1).mean()) for name, m in contenders.items()}

    print(f"\nsequence 128; best of interleaved runs; mean cosine to FP32 over {len(sentences)} sentences")
    print(f"{'':20} {'batch 1 ms':>11} {'x FP32':>7} {'batch 32 ms':>12} {'x FP32':>7} {'mean cos':>9}")
    for name in contenders:
        b1, b32 = results[1][name], results[32][name]
        print(f"{name:20} {b1 * 1e3:11.1f} {b1 / results[1]['Hugging Face FP32']:7.2f} {b32 * 1e3:12.1f} "
              f"{b32 / results[32]['Hugging Face FP32']:7.2f} {cosine[name]:9.5f}")
    fp1, fp32_b32 = results[1]["Hugging Face FP32"], results[32]["Hugging Face FP32"]
    print(f"cpu_speed: b1_ratio={results[1]['ambert cpu'] / fp1:.2f} "
          f"b32_ratio={results[32]['ambert cpu'] / fp32_b32:.2f} "
          f"dyn_b32_ratio={results[32]['torch dynamic int8'] / fp32_b32:.2f}")


if __name__ == "__main__":
    sys.exit(main())
