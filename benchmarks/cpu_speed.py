#!/usr/bin/env python3
"""The CPU backend against what a CPU user would pick instead, on the bundled all-MiniLM-L6-v2.

Hugging Face FP32, torch's dynamic int8 (``quantize_dynamic`` of every Linear) and ambert's ``cpu``
device (the integer reference behind the runtime, as ``--device cpu`` runs it), at sequence 128, batch 1
and 32, each the best of interleaved runs in one process (so a machine whose speed drifts hits all three
alike); the CPU model and its int8 features printed; each one's mean cosine to FP32 on the evaluation
sentences. Last line:

    cpu_speed: b1_ratio=<ambert/fp32> b32_ratio=<ambert/fp32> dyn_b32_ratio=<dynamic int8/fp32>
        peak_ratio=<ambert/fp32 peak RSS at batch 32>

    python benchmarks/cpu_speed.py [--reps N] [--isa avx2] [--no-int8-kernel]

``--isa avx2`` runs every contender as on a CPU with AVX2 and no AVX-512, VNNI or AMX (torch's kernels,
oneDNN, MKL and numba's code generation each held to AVX2 by its own switch, set before any of them
loads): torch's int8 kernel is then the AVX2 one, which ambert's probe finds inexact, so ambert's GEMMs
take the float32 path as on such a machine. ``--no-int8-kernel`` keeps the CPU's full instruction set
and only withholds the int8 kernel from ambert.

Peak memory: each contender in a fresh process (a forked one would share this one's pages and threads),
loading its model as a user does (ambert from its artifact) and running batch 32 once.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# each library's switch that holds its kernels to AVX2 (read when the library loads)
AVX2_ONLY = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                 NUMBA_CPU_NAME="haswell")

from ambert.report.measure import best_of_interleaved, cpu_description, status_kib  # noqa: E402


def peak_memory(contender, artifact_path, batch):
    """In this (fresh) process: load ``contender`` as a user would, run ``batch`` sentences of 128 tokens
    once; print the peak resident set size in MiB and how much of it the forward added. Each contender
    imports only what it runs (ambert's runtime does not import ``BertModel`` and what that pulls in)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from ambert.sw.quant.hf import bundled_model_dir
    folder = bundled_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    if contender == "ambert cpu":
        from ambert.sw.quant import artifact
        from ambert.sw.runtime import OffloadedBert
        from ambert.sw.runtime.cpu import CpuDevice
        model = OffloadedBert(artifact.load(artifact_path), AutoConfig.from_pretrained(folder), [CpuDevice()])
    else:
        from transformers import BertModel
        model = BertModel.from_pretrained(folder).eval()
        if contender == "torch dynamic int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    enc = tok(["a sentence"] * batch, padding="max_length", max_length=128, return_tensors="pt")
    loaded = status_kib("VmRSS")
    with torch.no_grad():
        model(**enc)
    peak = status_kib("VmHWM")
    print(f"{peak / 1024:.1f} {(peak - loaded) / 1024:.1f}")


def measure_peaks(contenders, artifact_path, batch, flags=()):
    """Each contender's (peak MiB, MiB the forward added), each in a fresh process."""
    import subprocess
    out = {}
    for name in contenders:
        run = subprocess.run([sys.executable, __file__, "--peak", name, "--artifact", str(artifact_path),
                              "--batch", str(batch), *flags], capture_output=True, text=True, timeout=600)
        if run.returncode:
            raise RuntimeError(f"peak memory of {name}: {run.stderr.strip().splitlines()[-1:]}")
        peak, added = run.stdout.split()[-2:]
        out[name] = (float(peak), float(added))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved runs at batch 32 (4x that at batch 1)")
    p.add_argument("--no-int8-kernel", action="store_true",
                   help="run ambert's GEMMs as on a CPU whose int8 kernel is not exact (no VNNI): float32 "
                        "over exact K-chunks")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: every contender held to AVX2, as on a CPU without AVX-512, VNNI or AMX")
    p.add_argument("--peak", help=argparse.SUPPRESS)           # the child process of measure_peaks
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.environ.update(AVX2_ONLY)                # before torch loads: start again with the switches set
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.no_int8_kernel:
        from ambert.sw.quant import ref
        ref._INT_MM_OK = False               # the probe's answer on a CPU without an exact int8 kernel
    if args.peak:
        return peak_memory(args.peak, args.artifact, args.batch)
    import torch
    from ambert.sw.quant import ref
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
          f"{torch.get_num_threads()} intra-op threads"
          + (f"; held to AVX2 (torch's kernels: {torch.backends.cpu.get_cpu_capability()}, ambert's int8 "
             f"kernel probe: {'int8 GEMMs' if ref._cpu_int_mm_ok() else 'inexact or slower, float32 GEMMs'})"
             if args.isa == "avx2" else "")
          + ("; ambert's GEMMs without the int8 kernel (--no-int8-kernel)" if args.no_int8_kernel else ""))
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

    import tempfile
    from ambert.sw.quant import artifact
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.safetensors"
        artifact.save(qm, path)
        peaks = measure_peaks(contenders, path, 32, ["--no-int8-kernel"] if args.no_int8_kernel else [])

    print(f"\nsequence 128; best of interleaved runs; mean cosine to FP32 over {len(sentences)} sentences; "
          f"peak RSS of a fresh process that loads the model and runs batch 32 once (and what the forward "
          f"added to it)")
    print(f"{'':20} {'batch 1 ms':>11} {'x FP32':>7} {'batch 32 ms':>12} {'x FP32':>7} {'mean cos':>9} "
          f"{'peak MiB':>9} {'forward MiB':>12}")
    for name in contenders:
        b1, b32 = results[1][name], results[32][name]
        print(f"{name:20} {b1 * 1e3:11.1f} {b1 / results[1]['Hugging Face FP32']:7.2f} {b32 * 1e3:12.1f} "
              f"{b32 / results[32]['Hugging Face FP32']:7.2f} {cosine[name]:9.5f} {peaks[name][0]:9.0f} "
              f"{peaks[name][1]:12.0f}")
    fp1, fp32_b32 = results[1]["Hugging Face FP32"], results[32]["Hugging Face FP32"]
    print(f"cpu_speed: b1_ratio={results[1]['ambert cpu'] / fp1:.2f} "
          f"b32_ratio={results[32]['ambert cpu'] / fp32_b32:.2f} "
          f"dyn_b32_ratio={results[32]['torch dynamic int8'] / fp32_b32:.2f} "
          f"peak_ratio={peaks['ambert cpu'][0] / peaks['Hugging Face FP32'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
