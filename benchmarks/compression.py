#!/usr/bin/env python3
"""Compression beyond int8: structured pruning swept over the fraction of encoder MACs removed, with and
without distillation, on the bundled all-MiniLM-L6-v2.

For each fraction: ``ambert prune`` (heads and FFN neurons), the MACs and encoder weight bytes left, the
whole-model cycles of the simulated 16x16 accelerator on one 128-token sequence (transfers included, from
the device's counters; its output checked `==` the integer reference), and the fidelity of the integer
model to the FP32 teacher on tests/fixtures/sentences.txt (mean and min cosine of the mean-pooled
embeddings, Spearman of the pairwise similarities) after pruning alone and after ``ambert distill``.
The last line, for the 40% row after distillation:

    compression: macs_removed=<f> cycles_speedup=<x> mean_cos=<c> spearman=<s>

Targets (issue 28): at >= 40% of MACs removed, cycles >= 1.5x fewer than dense int8, encoder weight
bytes >= 35% fewer, and after distillation mean_cos >= 0.98 and spearman >= 0.97; distillation <= 30 min.
"""

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", default="0,0.25,0.4,0.5,0.6", help="fractions of encoder MACs to remove")
    p.add_argument("--steps", type=int, help="distillation steps per fraction (default: the recipe's)")
    p.add_argument("--distill", default="all", help="fractions to distil: all, none or a list (default: all)")
    p.add_argument("--granularity", default="heads,neurons",
                   help="what `ambert prune` may remove: any of heads, neurons, tiles (default: heads,neurons)")
    p.add_argument("--tile-share", type=float, default=0.5, help="with tiles and heads or neurons: the tiles' "
                   "share of the MACs removed (default: 0.5)")
    p.add_argument("--layer-floor", type=float, help="each layer keeps at least this times the share of MACs the "
                   "model keeps (default: `ambert prune`'s)")
    p.add_argument("--sentences", type=Path, default=ROOT / "tests" / "fixtures" / "sentences.txt")
    args = p.parse_args()

    import torch
    from ambert.sw.quant import artifact
    from ambert.sw.quant.distill import DistillConfig, distill_artifact
    from ambert.sw.quant.fidelity import embedding_fidelity
    from ambert.sw.quant.hf import load_bert, load_tokenizer
    from ambert.sw.quant.model import encoder_macs
    from ambert.sw.quant.prune import LAYER_FLOOR, prune_pretrained
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.sw.runtime import offload
    from ambert.report.measure import cpu_description, encoder_weight_bytes

    fractions = [float(f) for f in args.fractions.split(",")]
    distilled = (fractions if args.distill == "all" else [] if args.distill == "none"
                 else [float(f) for f in args.distill.split(",")])
    granularity = tuple(g.strip() for g in args.granularity.split(",") if g.strip())
    floor = LAYER_FLOOR if args.layer_floor is None else args.layer_floor
    sentences = read_sentences(args.sentences)
    teacher, tok = load_bert(), load_tokenizer()
    text = " ".join(sentences[:12])
    enc128 = tok([text], padding="max_length", max_length=128, truncation=True, return_tensors="pt")

    def fidelity(qm):
        cos, rho = embedding_fidelity(teacher, lambda e: qm.forward(e["input_ids"], e["attention_mask"]), tok,
                                      sentences)
        return float(cos.mean()), float(cos.min()), rho

    def cycles(qm):
        mod = offload(teacher, device="sim", quantized=qm)
        out = mod(**enc128).last_hidden_state
        if not torch.equal(out, qm.forward(enc128["input_ids"], enc128["attention_mask"],
                                           enc128["token_type_ids"])):
            raise SystemExit("the simulated accelerator's output differs from the integer reference")
        return mod.last_stats.cycles

    rows = []
    with tempfile.TemporaryDirectory(prefix="ambert-compression-") as tmp:
        for f in fractions:
            t0 = time.perf_counter()
            if f == 0:
                qm, _, _ = quantize_pretrained(progress=False)
            else:
                qm, _, _ = prune_pretrained(f, granularity, progress=False, tile_share=args.tile_share,
                                            floor=floor)
            t_prune = time.perf_counter() - t0
            tile_macs = qm.source.get("pruning", {}).get("tile_macs_removed", 0)
            row = dict(fraction=f, macs=encoder_macs(qm.config) - tile_macs, bytes=encoder_weight_bytes(qm),
                       cycles=cycles(qm),
                       pruned=fidelity(qm), t_prune=t_prune)
            if f > 0 and f in distilled:
                path = artifact.save(qm, Path(tmp) / f"p{f}.ambert.safetensors")
                t0 = time.perf_counter()
                dc = DistillConfig() if args.steps is None else DistillConfig(steps=args.steps)
                dq, _, _ = distill_artifact(path, dc=dc, progress=True)
                row["t_distill"] = time.perf_counter() - t0
                row["distilled"] = fidelity(dq)
            rows.append(row)
            print(f"{f:.0%}: {row}", file=sys.stderr, flush=True)

    dense = rows[0] if rows[0]["fraction"] == 0 else None
    print(f"\nmachine: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{datetime.date.today()}; `python benchmarks/compression.py --fractions {args.fractions}"
          f"{'' if args.steps is None else f' --steps {args.steps}'} --distill {args.distill} "
          f"--granularity {args.granularity} --layer-floor {floor:g}`")
    print(f"evaluation: {len(sentences)} sentences of {args.sentences.name}; cycles: one 128-token sequence on "
          f"the simulated 16x16 accelerator (transfers included)\n")
    head = ("| MACs removed | MACs left (M) | encoder weights (MiB) | vs dense | device cycles | speedup "
            "| pruned: mean / min cos, Spearman | distilled: mean / min cos, Spearman | distill time |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        vs = f"{1 - r['bytes'] / dense['bytes']:.1%} fewer" if dense else "—"
        speed = f"{dense['cycles'] / r['cycles']:.2f}x" if dense else "—"
        pr = "{:.4f} / {:.4f}, {:.4f}".format(*r["pruned"])
        ds = "{:.4f} / {:.4f}, {:.4f}".format(*r["distilled"]) if "distilled" in r else "—"
        td = f"{r['t_distill'] / 60:.1f} min" if "t_distill" in r else "—"
        print(f"| {r['fraction']:.0%} | {r['macs'] / 1e6:.0f} | {r['bytes'] / 2**20:.2f} | {vs} | {r['cycles']:,} "
              f"| {speed} | {pr} | {ds} | {td} |")
    pick = next((r for r in rows if abs(r["fraction"] - 0.4) < 1e-9 and "distilled" in r), None)
    if pick and dense:
        print(f"compression: macs_removed={1 - pick['macs'] / dense['macs']:.3f} "
              f"cycles_speedup={dense['cycles'] / pick['cycles']:.2f} mean_cos={pick['distilled'][0]:.4f} "
              f"spearman={pick['distilled'][2]:.4f}")


if __name__ == "__main__":
    main()
