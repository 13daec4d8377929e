#!/usr/bin/env python3
"""Fidelity of the integer-only MiniLM to FP32 on the 206 fixture sentences.

Quantizes the bundled all-MiniLM-L6-v2 (calibrating on the bundled calibration set, which is disjoint
from the evaluation sentences), then prints per-layer SQNR of every traced tensor and, last, one line:

    fidelity: mean_cos=... min_cos=... spearman=...

Targets (issue 2): mean_cos >= 0.995, min_cos >= 0.98, spearman >= 0.99.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=Path, default=ROOT / "tests" / "fixtures" / "sentences.txt")
    p.add_argument("--artifact", type=Path, help="use this quantized model instead of quantizing anew")
    args = p.parse_args()

    import torch
    from tqdm import tqdm
    from ambert.sw.quant import artifact
    from ambert.sw.quant.fidelity import TENSORS, measure
    from ambert.sw.quant.hf import load_bert, load_tokenizer
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences

    sentences = read_sentences(args.sentences)
    t0 = time.perf_counter()
    if args.artifact:
        qm, model, tok = artifact.load(args.artifact), load_bert(), load_tokenizer()
    else:
        qm, model, tok = quantize_pretrained()
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = measure(model, qm, tok, sentences, progress=lambda b: tqdm(b, desc="measuring", unit="batch"))
    t_measure = time.perf_counter() - t0

    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"quantize {t_quant:.1f} s, measure {t_measure:.1f} s ({len(sentences)} sentences, FP32 + integer)")
    print("\nSQNR (dB) of each integer tensor vs FP32, per layer:")
    print("layer " + " ".join(f"{n:>6}" for n in TENSORS))
    for i, row in enumerate(fid.sqnr):
        print(f"{i:5d} " + " ".join(f"{row[n]:6.1f}" for n in TENSORS))
    cos = fid.cosines
    print(f"\nper-sentence cosine: mean {cos.mean():.5f}, min {cos.min():.5f}, "
          f"p5 {cos.quantile(0.05):.5f}, median {cos.median():.5f}")
    worst = int(cos.argmin())
    print(f"worst sentence ({cos[worst]:.5f}): {sentences[worst]}")
    print(f"fidelity: mean_cos={fid.mean_cos:.5f} min_cos={fid.min_cos:.5f} spearman={fid.spearman:.5f}")


if __name__ == "__main__":
    main()
