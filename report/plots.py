"""The report's figures (matplotlib, Agg: no display needed), each written as a PNG into the report's
folder; every function returns the file name the page links."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt     # noqa: E402 - after choosing the backend

__all__ = ["sqnr", "baselines", "pareto", "pooling", "parallel", "acceleration"]

DPI = 110


def _save(fig, out, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def sqnr(out, rows, tensors):
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in tensors:
        ax.plot(range(len(rows)), [r[name] for r in rows], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("SQNR (dB)")
    ax.set_xticks(range(len(rows)))
    ax.legend(ncol=7, fontsize=7, loc="lower center")
    ax.grid(alpha=.3)
    return _save(fig, out, "quantization_sqnr.png")


def baselines(out, times, fidelity):
    names = list(times[1])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(names))
    for off, batch in ((-0.2, 1), (0.2, 32)):
        ref = times[batch][names[0]]
        a.bar([i + off for i in x], [times[batch][n] / ref for n in names], width=0.4, label=f"batch {batch}")
    a.axhline(1, color="k", lw=.8)
    a.set_ylabel("wall time / Hugging Face FP32")
    b.bar(x, [fidelity[n][0] for n in names], color="tab:green")
    b.set_ylim(min(fidelity[n][0] for n in names) - 0.02, 1.0)
    b.set_ylabel("mean cosine to FP32")
    for ax in (a, b):
        ax.set_xticks(list(x))
        ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.grid(axis="y", alpha=.3)
    a.legend()
    return _save(fig, out, "baselines.png")


def pareto(out, rows):
    fig, ax = plt.subplots(figsize=(7, 4))
    cyc = [r["cycles"] / 1e6 for r in rows]
    ax.plot(cyc, [r["pruned"][0] for r in rows], marker="o", label="pruned (heads, neurons)")
    for r in rows:
        ax.annotate(f"{r['fraction']:.0%}", (r["cycles"] / 1e6, r["pruned"][0]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    dist = [r for r in rows if "distilled" in r]
    if dist:
        ax.scatter([r["cycles"] / 1e6 for r in dist], [r["distilled"][0] for r in dist], marker="*", s=150,
                   color="tab:red", label="pruned and distilled", zorder=3)
    ax.set_xlabel("device cycles per sequence (millions, 16x16 simulated)")
    ax.set_ylabel("mean cosine to FP32")
    ax.grid(alpha=.3)
    ax.legend()
    return _save(fig, out, "compression_pareto.png")


def pooling(out, fp32_rss, ambert_rss, pss):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(["HF FP32", "ambert (mapped)"], [fp32_rss[1] - fp32_rss[0], ambert_rss[1] - ambert_rss[0]],
          color=["tab:gray", "tab:blue"])
    a.set_ylabel("RSS that loading adds (MiB)")
    workers = sorted(pss)
    b.plot(workers, [pss[w][0] for w in workers], marker="o", label="whole tree")
    b.plot(workers, [pss[w][1] for w in workers], marker="s", label="mapped weights")
    b.set_xlabel("serve workers")
    b.set_ylabel("PSS (MiB)")
    b.set_xticks(workers)
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=.3)
    return _save(fig, out, "pooling.png")


def parallel(out, curves):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in curves.items():
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color=line.get_color(), alpha=.6)
    ranks = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xticks(ranks)
    ax.set_xlabel("ranks (simulated devices)")
    ax.set_ylabel("speedup over one device")
    ax.set_title("solid: measured; dashed: ideal (pipeline: with its bubble)", fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "parallelism.png")


def acceleration(out, efficiency, latency):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh([n for n, _ in efficiency], [e * 100 for _, e in efficiency])
    a.set_xlabel("array efficiency (%)")
    a.invert_yaxis()
    a.tick_params(axis="y", labelsize=7)
    if latency:
        b.bar([n for n, _ in latency], [ms for _, ms in latency], color="tab:orange")
        b.set_yscale("log")
        b.tick_params(axis="x", labelsize=7, rotation=20)
    b.set_ylabel("MiniLM latency (ms, modeled at the board's clock)")
    for ax in (a, b):
        ax.grid(alpha=.3)
    return _save(fig, out, "acceleration.png")
