#!/usr/bin/env python3
"""All-MiniLM-L6-v2, all 6 layers, batch 1, sequence 128, on the simulated 16x16 accelerator.

Every GEMM runs on the Verilated top; the output is checked `==` the CPU integer reference. Also times
the CPU integer reference against Hugging Face FP32 on the same input. Last line:

    e2e_minilm: sim_wall_s=... cycles=... efficiency=... pool_peak_kib=... pool_naive_kib=... cpu_ref_vs_fp32=...x

"pool" is the liveness-planned peak of the largest program against the same program with nothing reused.
"""

import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import torch
    from ambert.report.measure import best_of_interleaved
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.sw.runtime import offload

    qm, model, tok = quantize_pretrained(progress=False)
    text = " ".join(read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")[:12])
    enc = tok([text], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    mod = offload(model, device="sim", quantized=qm)
    mod(**tok(["warm up"], return_tensors="pt"))           # builds or loads the Verilated model
    t0 = time.perf_counter()
    out = mod(**enc).last_hidden_state
    sim_wall = time.perf_counter() - t0
    st = mod.last_stats
    lanes = mod.runner.devices[0].shape.lanes

    with torch.no_grad():
        ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        t_ref, t_fp32 = best_of_interleaved(reps=10, fns=[
            lambda: qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
            lambda: model(**enc)])
    exact = torch.equal(out, ref)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; batch 1, sequence 128")
    print(f"{'what':38} {'value':>16}")
    rows = [("simulated accelerator wall time (s)", f"{sim_wall:.1f}"),
            ("device cycles (transfers included)", f"{st.cycles:,}"),
            ("cycles the MATMUL engine ran", f"{st.busy_cycles:,}"),
            ("array efficiency while running", f"{st.efficiency:.1%}"),
            ("whole-model efficiency (all cycles)", f"{st.overall_efficiency:.1%}"),
            ("pool: planned peak (KiB)", f"{st.pool_peak_words * lanes / 1024:.0f}"),
            ("pool: naive, nothing reused (KiB)", f"{st.pool_naive_words * lanes / 1024:.0f}"),
            ("pool: size (KiB)", f"{mod.runner.devices[0].shape.pool_words * lanes / 1024:.0f}"),
            ("host link traffic (MiB)", f"{st.host_words * 4 / 2**20:.1f}"),
            ("modeled latency at 100 MHz (ms)", f"{st.latency_s(100e6) * 1e3:.1f}"),
            ("output == CPU integer reference", str(exact)),
            ("CPU integer reference (ms)", f"{t_ref * 1e3:.1f}"),
            ("Hugging Face FP32 (ms)", f"{t_fp32 * 1e3:.1f}")]
    for name, value in rows:
        print(f"{name:38} {value:>16}")
    if not exact:
        raise SystemExit("the simulated accelerator's output differs from the integer reference")
    print(f"e2e_minilm: sim_wall_s={sim_wall:.1f} cycles={st.cycles} "
          f"efficiency={st.overall_efficiency:.3f} pool_peak_kib={st.pool_peak_words * lanes / 1024:.0f} "
          f"pool_naive_kib={st.pool_naive_words * lanes / 1024:.0f} cpu_ref_vs_fp32={t_ref / t_fp32:.2f}x")


if __name__ == "__main__":
    main()
