"""The report's sections, one function a strategy: each measures on this machine, fills a
:class:`~ambert.report.page.Section` with tables and figures, and says what it could not measure here.

Every value a table holds comes from a measurement of this run; each function's docstring says how it
measures. Device outputs are checked ``==`` the integer reference before their cycles are reported."""

import copy
import dataclasses
import io
import math
import os
import time

import torch

from . import plots
from .measure import best_of_interleaved, cpu_int8_features, encoder_weight_bytes, gpipe_makespan, link_cycles

__all__ = ["SECTIONS"]

CLOCK_HZ = 100e6                 # the clock the device-cycle latencies are quoted at (the ULX3S target's)
LINK_BYTES_S = 1e9               # a board interconnect, for the parallel modes' modeled traffic


def _fidelity(ctx, embed):
    """(mean cos, min cos, Spearman) of ``embed(enc) -> last hidden state`` against the FP32 teacher."""
    from ambert.sw.quant.fidelity import embedding_fidelity
    if ctx.teacher.training:
        raise RuntimeError("the FP32 teacher is in training mode (dropout on): its embeddings would not be FP32's")
    cos, rho = embedding_fidelity(ctx.teacher, embed, ctx.tokenizer, ctx.sentences)
    return float(cos.mean()), float(cos.min()), float(rho)


def _mib(nbytes):
    return nbytes / 2**20


# ------------------------------------------------------------------------------------------- quantization

def quantization(ctx, sec, step):
    """Quantize the bundled MiniLM (calibrated on the bundled calibration set, disjoint from the evaluation
    sentences) and save its artifact; fidelity of the integer model to FP32 and the SQNR of every traced
    integer tensor against its FP32 twin (:func:`ambert.sw.quant.fidelity.measure`); model bytes on disk."""
    from ambert.sw.quant import artifact
    from ambert.sw.quant.fidelity import TENSORS, measure
    from ambert.sw.quant.hf import bundled_model_dir
    from ambert.sw.quant.quantize import quantize_pretrained
    step("calibrating and quantizing")
    t0 = time.perf_counter()
    ctx.qm, _, _ = quantize_pretrained(progress=False)
    t_quant = time.perf_counter() - t0
    ctx.artifact = artifact.save(ctx.qm, ctx.work / "minilm.ambert.safetensors")
    step("fidelity and SQNR")
    fid = measure(ctx.teacher, ctx.qm, ctx.tokenizer, ctx.sentences)
    ctx.fidelity["ambert int8"] = (fid.mean_cos, fid.min_cos, float(fid.spearman))
    fp32_file = bundled_model_dir() / "model.safetensors"
    fp32_bytes, int_bytes = fp32_file.stat().st_size, ctx.artifact.stat().st_size
    fp32_enc = sum(p.numel() * p.element_size() for n, p in ctx.teacher.named_parameters() if ".layer." in n)
    int_enc = encoder_weight_bytes(ctx.qm)
    t = sec.table("Model bytes and fidelity to FP32", [
        ("model", ""), ("file MiB", ".2f"), ("encoder weights MiB", ".2f"), ("mean cos", ".4f"),
        ("min cos", ".4f"), ("pairwise Spearman", ".4f")],
        note=f"{len(ctx.sentences)} evaluation sentences (tests/fixtures/sentences.txt), mean-pooled embeddings. "
             f"Calibration and quantization took {t_quant:.0f} s.")
    t.add("Hugging Face FP32 (safetensors)", _mib(fp32_bytes), _mib(fp32_enc), None, None, None)
    t.add("ambert integer-only (artifact)", _mib(int_bytes), _mib(int_enc), fid.mean_cos, fid.min_cos,
          float(fid.spearman))
    sq = sec.table("SQNR (dB) of each integer tensor against FP32, per layer",
                   [("layer", "d")] + [(n, ".1f") for n in TENSORS])
    for i, row in enumerate(fid.sqnr):
        sq.add(i, *(float(row[n]) for n in TENSORS))
    sec.text.append(f"The integer-only model is {fp32_bytes / int_bytes:.2f}x smaller on disk than FP32 and keeps "
                    f"a mean cosine of {fid.mean_cos:.4f} (min {fid.min_cos:.4f}) to FP32's sentence embeddings; "
                    f"the weakest tensor is {_weakest(fid.sqnr)}.")
    sec.figures.append((plots.sqnr(ctx.out, fid.sqnr, TENSORS), "SQNR of each integer tensor against FP32, by layer"))
    return {"quant_mean_cos": (fid.mean_cos, ".4f", "integer MiniLM: mean cosine to FP32"),
            "quant_bytes": (fp32_bytes / int_bytes, ".2fx", "integer MiniLM: smaller on disk than FP32")}


def _weakest(sqnr):
    layer, name, db = min(((i, n, v) for i, row in enumerate(sqnr) for n, v in row.items()), key=lambda x: x[2])
    return f"{name} of layer {layer} at {db:.1f} dB"


# -------------------------------------------------------------------------------------------- baselines

def _ort_config():
    """The configuration sentence-transformers' ``export_dynamic_quantized_onnx_model`` names for this CPU
    (its ``avx512_vnni`` / ``avx2`` / ``arm64``), as ``onnxruntime.quantization.quantize_dynamic`` arguments:
    dynamic quantization of the MatMul / Gemm / Attention operators, uint8 activations (asymmetric), int8
    weights symmetric per channel, full range."""
    from onnxruntime.quantization import QuantType
    _, have = cpu_int8_features()
    name = ("avx512_vnni" if "avx512_vnni" in have else "arm64" if "asimddp" in have or os.uname().machine == "aarch64"
            else "avx512" if "avx512f" in have else "avx2")
    return name, dict(per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                      extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def onnx_int8(ctx):
    """Export the FP32 model to ONNX as Optimum's feature-extraction export does (TorchScript exporter,
    dynamic batch and sequence axes) and quantize it dynamically as sentence-transformers does; return
    ``(run(enc) -> last hidden state, file bytes, config name)``."""
    import logging
    import warnings
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_dynamic
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Export(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    enc = ctx.batch(2, 16)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    fp32_path, int8_path = ctx.work / "model.onnx", ctx.work / "model_qint8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a copy: the exporter switches the module's training mode, and the teacher must stay as it is
        torch.onnx.export(Export(copy.deepcopy(ctx.teacher)), tuple(enc[n] for n in names), str(fp32_path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=14, dynamo=False)
    name, kwargs = _ort_config()
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)          # its advice to pre-process, printed on every call
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), **kwargs)
    finally:
        logging.getLogger().setLevel(level)
    options = ort.SessionOptions()
    # its idle threads would otherwise spin after each run, taking the cores from whatever is timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])

    def run(enc):
        return torch.from_numpy(session.run(None, {n: enc[n].numpy() for n in names})[0])
    return run, int8_path.stat().st_size, name


def baselines(ctx, sec, step):
    """Wall time per batch of 128-token sentences at batch 1 and 32 (the best of interleaved runs in this
    process, so a machine whose speed drifts slows each alike), bytes on disk and fidelity to FP32, for what
    a CPU user would pick instead of ambert: Hugging Face FP32, torch's dynamic int8 (``quantize_dynamic``
    of every Linear) and ONNX Runtime int8 as sentence-transformers exports it — against ambert's ``cpu``
    device running the integer model."""
    import warnings
    from ambert.sw.quant.hf import bundled_model_dir
    from ambert.sw.runtime import offload
    s = ctx.settings
    step("exporting ONNX and quantizing it")
    ort_run, ort_bytes, ort_name = onnx_int8(ctx)
    with warnings.catch_warnings():
        # torch's quantized tensors are deprecated, and what a CPU user picks today all the same
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(ctx.teacher, {torch.nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(dynamic.state_dict(), buf)
    ambert = offload(ctx.teacher, device="cpu", quantized=ctx.qm)
    contenders = {
        "Hugging Face FP32": (lambda e: ctx.teacher(**e).last_hidden_state,
                              (bundled_model_dir() / "model.safetensors").stat().st_size),
        "torch dynamic int8": (lambda e: dynamic(**e).last_hidden_state, buf.getbuffer().nbytes),
        f"ONNX Runtime int8 ({ort_name})": (ort_run, ort_bytes),
        "ambert cpu (integer-only)": (lambda e: ambert(**e).last_hidden_state, ctx.artifact.stat().st_size)}
    times = {}
    with torch.no_grad():
        for batch, reps in ((1, 4 * s.reps), (32, s.reps)):
            step(f"timing batch {batch}")
            enc = dict(ctx.tokenizer((ctx.sentences * 32)[:batch], padding="max_length", max_length=128,
                                     truncation=True, return_tensors="pt"))
            for fn, _ in contenders.values():
                fn(enc)                                  # first-call allocations, lazy initialisation
            times[batch] = dict(zip(contenders, best_of_interleaved([lambda f=f: f(enc) for f, _ in
                                                                     contenders.values()], reps)))
        step("fidelity")
        fid = {name: _fidelity(ctx, fn) for name, (fn, _) in contenders.items()}
    fp1, fp32 = times[1]["Hugging Face FP32"], times[32]["Hugging Face FP32"]
    t = sec.table("Wall time, bytes and fidelity on this CPU", [
        ("", ""), ("batch 1 ms", ".1f"), ("vs FP32", ".2fx"), ("batch 32 ms", ".1f"), ("vs FP32", ".2fx"),
        ("file MiB", ".2f"), ("mean cos", ".4f"), ("min cos", ".4f"), ("Spearman", ".4f")],
        note=f"Sequence 128; best of {4 * s.reps} (batch 1) and {s.reps} (batch 32) interleaved runs, "
             f"{torch.get_num_threads()} threads; fidelity of mean-pooled embeddings to FP32 on "
             f"{len(ctx.sentences)} sentences (FP32's own row is 1 by definition).")
    for name, (_, nbytes) in contenders.items():
        t.add(name, times[1][name] * 1e3, times[1][name] / fp1, times[32][name] * 1e3, times[32][name] / fp32,
              _mib(nbytes), *fid[name])
    sec.figures.append((plots.baselines(ctx.out, times, fid), "Wall time relative to FP32 and mean cosine to FP32"))
    a = "ambert cpu (integer-only)"
    sec.text.append(f"At batch 32 ambert's cpu device takes {times[32][a] / fp32:.2f}x FP32's time, torch dynamic "
                    f"int8 {times[32]['torch dynamic int8'] / fp32:.2f}x and ONNX Runtime int8 "
                    f"{times[32][f'ONNX Runtime int8 ({ort_name})'] / fp32:.2f}x; their mean cosines to FP32: "
                    f"{fid[a][0]:.4f}, {fid['torch dynamic int8'][0]:.4f}, "
                    f"{fid[f'ONNX Runtime int8 ({ort_name})'][0]:.4f}.")
    return {"cpu_b32": (times[32][a] / fp32, ".2fx", "ambert cpu, batch 32: time vs Hugging Face FP32"),
            "cpu_b1": (times[1][a] / fp1, ".2fx", "ambert cpu, batch 1: time vs Hugging Face FP32"),
            "ort_cos": (fid[f"ONNX Runtime int8 ({ort_name})"][0], ".4f", "ONNX Runtime int8: mean cosine to FP32"),
            "dyn_cos": (fid["torch dynamic int8"][0], ".4f", "torch dynamic int8: mean cosine to FP32")}


# ------------------------------------------------------------------------------------------- compression

def _device_cycles(ctx, qm, enc, config=None):
    """Whole-model cycles of one forward on a simulated accelerator (transfers included, from its own
    counters), the output checked ``==`` the integer reference; returns the run's Stats."""
    from ambert.sw.runtime import OffloadedBert
    from ambert.sw.runtime.sim import SimDevice
    device = SimDevice(config) if config is not None else SimDevice()
    model = OffloadedBert(qm, ctx.teacher.config, [device])
    out = model(**enc).last_hidden_state
    want = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    if not torch.equal(out, want):
        raise RuntimeError("the simulated accelerator's output differs from the integer reference")
    if set(model.last_stats.ops) != {"sim"}:
        raise RuntimeError(f"not every matmul ran on the simulated accelerator: {model.last_stats.ops}")
    return model.last_stats


def compression(ctx, sec, step):
    """``ambert prune`` (attention heads and FFN neurons, physically removed) at each fraction of encoder
    MACs; the MACs and encoder weight bytes left, the whole-model cycles of the simulated 16x16 accelerator
    on one sequence, fidelity to the FP32 teacher after pruning alone and, for the distilled fraction,
    after ``ambert distill`` (a shortened recipe: the steps the table names)."""
    from ambert.sw.quant import artifact
    from ambert.sw.quant.distill import DistillConfig, distill_artifact
    from ambert.sw.quant.model import encoder_macs
    from ambert.sw.quant.prune import prune_pretrained
    s = ctx.settings
    enc = ctx.batch(1)
    rows = []
    for f in s.fractions:
        step(f"pruning {f:.0%}")
        qm = ctx.qm if f == 0 else prune_pretrained(f, progress=False)[0]
        step(f"cycles and fidelity at {f:.0%}")
        fwd = (lambda q: lambda e: q.forward(e["input_ids"], e["attention_mask"]))(qm)
        row = dict(fraction=f, macs=encoder_macs(qm.config), bytes=encoder_weight_bytes(qm),
                   cycles=_device_cycles(ctx, qm, enc).cycles, pruned=_fidelity(ctx, fwd))
        if f > 0 and math.isclose(f, s.distill_fraction):
            step(f"distilling {f:.0%} ({s.distill_steps} steps)")
            path = artifact.save(qm, ctx.work / f"pruned-{f}.ambert.safetensors")
            t0 = time.perf_counter()
            dq = distill_artifact(path, dc=DistillConfig(steps=s.distill_steps, batch=s.distill_batch,
                                                         checkpoint_every=max(s.distill_steps, 1)),
                                  checkpoint=ctx.work / f"distill-{f}.pt", progress=False)[0]
            row["t_distill"] = time.perf_counter() - t0
            row["distilled"] = _fidelity(ctx, lambda e: dq.forward(e["input_ids"], e["attention_mask"]))
        rows.append(row)
    dense = rows[0]
    t = sec.table("Structured pruning swept over the encoder MACs removed", [
        ("MACs removed", ".0%"), ("MACs left (M)", ".1f"), ("encoder weights MiB", ".2f"), ("bytes saved", ".1%"),
        ("device cycles", ",d"), ("speedup", ".2fx"), ("pruned: mean cos", ".4f"), ("min cos", ".4f"),
        ("Spearman", ".4f"), ("distilled: mean cos", ".4f"), ("min cos", ".4f"), ("Spearman", ".4f"),
        ("distill min", ".1f")],
        note=f"Cycles: one {s.seq}-token sequence on the simulated 16x16 accelerator, transfers included, output "
             f"== the integer reference. Distillation: {s.distill_steps} steps of {s.distill_batch} sentences "
             f"(the default recipe, `ambert distill`, runs {DistillConfig().steps}). "
             f"Fidelity on {len(ctx.sentences)} sentences.")
    for r in rows:
        d = r.get("distilled", (None, None, None))
        t.add(1 - r["macs"] / dense["macs"], r["macs"] / 1e6, _mib(r["bytes"]), 1 - r["bytes"] / dense["bytes"],
              r["cycles"], dense["cycles"] / r["cycles"], *r["pruned"], *d,
              r["t_distill"] / 60 if "t_distill" in r else None)
    sec.figures.append((plots.pareto(ctx.out, rows), "Device cycles against fidelity to FP32: pruned, and distilled"))
    pick = next((r for r in rows if "distilled" in r), None)
    out = {}
    if pick:
        sec.text.append(f"Removing {1 - pick['macs'] / dense['macs']:.0%} of the encoder's MACs takes "
                        f"{dense['cycles'] / pick['cycles']:.2f}x fewer device cycles and "
                        f"{1 - pick['bytes'] / dense['bytes']:.0%} fewer weight bytes; pruning alone leaves a mean "
                        f"cosine of {pick['pruned'][0]:.4f}, distillation brings it to {pick['distilled'][0]:.4f}.")
        out = {"prune_speedup": (dense["cycles"] / pick["cycles"], ".2fx",
                                 f"pruned {pick['fraction']:.0%}: fewer device cycles"),
               "prune_cos": (pick["distilled"][0], ".4f", f"pruned {pick['fraction']:.0%} and distilled: mean cosine")}
    sec.absent.append("weight-tile pruning (`ambert prune --granularity tiles`, zero tiles skipped by the "
                      "accelerator): this sweep removes heads and neurons; `benchmarks/compression.py "
                      "--granularity tiles` sweeps tiles")
    return out


# ----------------------------------------------------------------------------------------- memory pooling

def _load_rss(kind, path):
    """In a fresh process: load the model as a user does; ``(RSS before MiB, RSS after MiB, peak MiB)``."""
    import subprocess
    import sys
    code = ("import os, sys; os.environ['HF_HUB_OFFLINE'] = '1'\n"
            "from ambert.report.measure import status_kib\n"
            "import torch, transformers, ambert.sw.quant.artifact as artifact\n"
            "from ambert.sw.quant.hf import bundled_model_dir\n"
            "before = status_kib('VmRSS')\n"
            f"m = transformers.BertModel.from_pretrained(bundled_model_dir()) if {kind!r} == 'fp32' else "
            f"artifact.load({str(path)!r})\n"
            "print(before, status_kib('VmRSS'), status_kib('VmHWM'))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(f"loading {kind} in a fresh process failed: {run.stderr.strip().splitlines()[-1:]}")
    return [int(v) / 1024 for v in run.stdout.split()[-3:]]


def variant_of(qm):
    """The model with its last FFN2 reversed along K: a second model of the same size and other weights."""
    layer = qm.layers[-1]
    return dataclasses.replace(qm, layers=[*qm.layers[:-1], dataclasses.replace(
        layer, w2=torch.flip(layer.w2, dims=[1]).contiguous())])


def resident_weight_runs(qm, variant, hf_config, enc):
    """Four calls on one simulated 16x16 device — ``qm``, ``qm`` again, ``variant``, ``qm`` — each output
    checked ``==`` the integer reference: ``([(call, host-link words, device cycles)], device shape)``.
    Weights that fit stay in the device's pool across calls and models, so later calls move fewer words."""
    from ambert.sw.runtime import OffloadedBert
    from ambert.sw.runtime.sim import SimDevice
    device = SimDevice()
    models = {"model": OffloadedBert(qm, hf_config, [device]), "variant": OffloadedBert(variant, hf_config, [device])}
    labels = {0: "MiniLM, first call", 1: "MiniLM, again", 2: "the variant, same device", 3: "MiniLM, after the variant"}
    runs = []
    for k, name in enumerate(("model", "model", "variant", "model")):
        out = models[name](**enc).last_hidden_state
        want = models[name].quantized.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        if not torch.equal(out, want):
            raise RuntimeError("the simulated accelerator's output differs from the integer reference")
        runs.append((labels[k], models[name].last_stats.host_words, models[name].last_stats.cycles))
    return runs, device.shape


def pooling(ctx, sec, step):
    """Resident memory to load each model in a fresh process; the PSS of ``ambert serve`` at several worker
    processes (the memory-mapped weights' pages are shared: PSS counts them once over all workers); a
    :class:`ModelPool` whose budget is below two models' sum serving both in turn; and the words the host
    link moves when weights stay resident in the device's pool across calls and models."""
    from ambert.sw.quant import artifact
    from ambert.sw.quant.hf import bundled_model_dir
    from ambert.sw.runtime.pool import ModelPool, tensor_bytes
    from .measure import ServeProcess, tree_memory
    s = ctx.settings
    step("memory to load")
    fp32_rss, ambert_rss = _load_rss("fp32", None), _load_rss("ambert", ctx.artifact)
    t = sec.table("Resident memory to load the model (fresh process, after importing torch)", [
        ("", ""), ("RSS before MiB", ".0f"), ("RSS after MiB", ".0f"), ("added MiB", ".1f"), ("peak MiB", ".0f")])
    for name, (before, after, peak) in (("Hugging Face FP32 from_pretrained", fp32_rss),
                                        ("ambert artifact (memory-mapped)", ambert_rss)):
        t.add(name, before, after, after - before, peak)

    step("serve workers")
    weight_bytes = tensor_bytes(artifact.read_header(ctx.artifact))
    w = sec.table("`ambert serve --workers N`: memory of the whole process tree", [
        ("workers", "d"), ("PSS MiB", ".0f"), ("weights' PSS MiB", ".1f"), ("peak RSS MiB (sum)", ".0f")],
        note=f"Weights: {_mib(weight_bytes):.1f} MiB of tensors, mapped from one artifact file; every worker has "
             f"answered requests before the figures are read.")
    folder = str(bundled_model_dir())
    pss = {}
    for workers in s.workers:
        with ServeProcess([("minilm", str(ctx.artifact), folder)], "--workers", str(workers)) as server:
            server.load(["minilm"], ctx.sentences, 4 * workers, 2.0)
            peak, total, weights = tree_memory(server.pid, ctx.artifact)
        pss[workers] = (total, weights)
        w.add(workers, total, weights, peak)
    # PSS is counted in whole KiB per process: a weights' share below that rounds either way
    per_extra = max(0.0, (pss[s.workers[-1]][1] - pss[s.workers[0]][1]) / (s.workers[-1] - s.workers[0]))
    sec.text.append(f"Each extra worker adds {per_extra:.2f} MiB of weights' PSS (the {_mib(weight_bytes):.1f} "
                    f"MiB of weights are mapped once) and {(pss[s.workers[-1]][0] - pss[s.workers[0]][0]) / (s.workers[-1] - s.workers[0]):.0f} "
                    f"MiB in all (its own interpreter, torch and activations).")

    step("pool under a budget")
    variant = artifact.save(variant_of(ctx.qm), ctx.work / "variant.ambert.safetensors")
    budget = int(1.5 * weight_bytes)
    pool = ModelPool(budget)
    pool.add("minilm", ctx.artifact)
    pool.add("variant", variant)
    enc = ctx.batch(1, 32)
    want = {"minilm": ctx.qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
            "variant": variant_of(ctx.qm).forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])}
    most, switch = 0, []
    for name in ["minilm", "variant"] * 4:
        t0 = time.perf_counter()
        qm = pool.get(name)
        switch.append(time.perf_counter() - t0)
        most = max(most, pool.bytes_in_use)
        if not torch.equal(qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), want[name]):
            raise RuntimeError(f"the pool's {name} answered differently from the model itself")
    p = sec.table("Two models through one pool whose budget is below their sum", [
        ("budget MiB", ".1f"), ("two models MiB", ".1f"), ("most in use MiB", ".1f"), ("requests", "d"),
        ("maps", "d"), ("evictions", "d"), ("slowest switch ms", ".1f")],
        note="Requests alternate between the two models; every answer == the model's own.")
    p.add(_mib(budget), _mib(2 * weight_bytes), _mib(most), len(switch), pool.loads, pool.evictions, max(switch) * 1e3)

    step("weights resident on the device")
    runs, shape = resident_weight_runs(ctx.qm, variant_of(ctx.qm), ctx.teacher.config, ctx.batch(1))
    h = sec.table("Host link with weights kept in the device's pool (simulated 16x16, one device)", [
        ("call", ""), ("host-link words", ",d"), ("vs first", ".1%"), ("device cycles", ",d")],
        note=f"{s.seq}-token sequence; 32-bit words both ways. The pool holds {shape.banks} x "
             f"{shape.bank_words} words of {shape.lanes} bytes; weights may take a quarter of it.")
    for label, words, cycles in runs:
        h.add(label, words, words / runs[0][1] - 1, cycles)
    sec.figures.append((plots.pooling(ctx.out, fp32_rss, ambert_rss, pss), "Memory to load, and PSS by workers"))
    return {"pss_extra": (per_extra, ".2f", "serve: weights' PSS each extra worker adds (MiB)"),
            "load_added": (ambert_rss[1] - ambert_rss[0], ".1f", "RSS that loading the integer MiniLM adds (MiB)")}


# ------------------------------------------------------------------------------------------- parallelism

def parallelism(ctx, sec, step):
    """Data, tensor and pipeline parallelism through ``ambert.sw.parallel.launch`` (torch.distributed, gloo,
    one process a rank, each with its own simulated 16x16 accelerator), every output ``==`` the single
    device's integer reference. Speedups come from the devices' own cycle counters: data, the slowest
    rank; tensor, the slowest rank plus two ring all-reduces a layer of the int32 partial sums at 1 GB/s;
    pipeline, the GPipe schedule replayed from each stage's cycles per micro-batch, against the ideal
    ``p m / (m + p - 1)`` that the bubble allows. Latency at 100 MHz."""
    from ambert.sw.quant import artifact
    s = ctx.settings
    qm = ctx.qm
    reps = s.pipeline_layers // len(qm.layers)
    deep = dataclasses.replace(qm, layers=[copy.deepcopy(p) for _ in range(reps) for p in qm.layers],
                               config={**qm.config, "layers": reps * len(qm.layers)})
    paths = {"minilm": ctx.artifact, "deep": artifact.save(deep, ctx.work / "deep.ambert.safetensors")}
    models = {"minilm": qm, "deep": deep}
    c = qm.config["hidden"]
    t = sec.table("Speedup over one device, from the devices' cycle counters", [
        ("mode", ""), ("ranks", "d"), ("critical cycles", ",.0f"), ("link cycles", ",.0f"), ("ms @100 MHz", ".2f"),
        ("speedup", ".2fx"), ("ideal", ".2fx"), ("wall s", ".1f")],
        note=f"Sequence {s.seq}; links modeled at {LINK_BYTES_S / 1e9:g} GB/s. Data and pipeline: throughput "
             f"speedup; tensor: latency. Pipeline ideal: p m / (m + p - 1), m = {s.micro_batches}. Wall time: the "
             f"ranks share this machine's cores, so it says little about the devices.")
    curves = {}

    def run(mode, name, enc, ranks, **kw):
        return launch_checked(mode, paths[name], models[name], enc, ranks, **kw)

    def add(label, ranks, critical, link, base, ideal, wall):
        total = critical + link
        speed = base / total
        curves.setdefault(label, []).append((ranks, speed, ideal))
        t.add(label, ranks, critical, link, total / CLOCK_HZ * 1e3, speed, ideal, wall)

    enc = ctx.batch(s.data_batch)
    base = None
    for ranks in s.ranks:
        step(f"data parallel, {ranks} ranks")
        result, wall = run("data", "minilm", enc, ranks)
        gathered = s.data_batch * s.seq * c * 2 * (ranks - 1) / ranks
        base = base or max(result.cycles)
        add(f"data, MiniLM, batch {s.data_batch}", ranks, max(result.cycles),
            link_cycles(gathered, LINK_BYTES_S, CLOCK_HZ), base, float(ranks), wall)
    enc = ctx.batch(1)
    base = None
    for ranks in s.ranks:
        step(f"tensor parallel, {ranks} ranks")
        result, wall = run("tensor", "minilm", enc, ranks)
        reduced = 2 * len(qm.layers) * s.seq * c * 4 * 2 * (ranks - 1) / ranks
        base = base or max(result.cycles)
        add("tensor, MiniLM, batch 1", ranks, max(result.cycles), link_cycles(reduced, LINK_BYTES_S, CLOCK_HZ),
            base, float(ranks), wall)
    m = s.micro_batches
    enc = ctx.batch(m)
    base = None
    for ranks in s.ranks:
        step(f"pipeline, {ranks} ranks")
        result, wall = run("pipeline", "deep", enc, ranks, micro_batches=m)
        send = link_cycles(s.seq * c * 3, LINK_BYTES_S, CLOCK_HZ) if ranks > 1 else 0.0
        makespan = gpipe_makespan(result.micro_cycles, send)
        base = base or makespan
        add(f"pipeline, {len(deep.layers)} layers, m={m}", ranks, makespan, 0.0, base, ranks * m / (m + ranks - 1),
            wall)
    sec.figures.append((plots.parallel(ctx.out, curves), "Speedup against ranks, with each mode's ideal"))
    last = s.ranks[-1]
    speed = {label.split(",")[0]: dict((r, sp) for r, sp, _ in pts) for label, pts in curves.items()}
    sec.text.append(f"At {last} ranks: data {speed['data'][last]:.2f}x, tensor {speed['tensor'][last]:.2f}x, "
                    f"pipeline {speed['pipeline'][last]:.2f}x (its bubble allows {last * m / (m + last - 1):.2f}x).")
    return {f"{mode}_x{last}": (speed[mode][last], ".2fx", f"{mode} parallel over {last} simulated devices")
            for mode in ("data", "tensor", "pipeline")}


# ------------------------------------------------------------------------------------------ acceleration

def run_random_gemm(sim, shape, m, k, n, rng):
    """One M x K x N GEMM of random int8 data (with random bias and requant constants) on a FastSim of
    ``shape``, its result checked ``==`` ref_matmul: ``(engine-busy cycles, total cycles)`` from the
    device's own counters read before and after it."""
    import numpy as np
    from ambert.proto.isa import Counters, Error, Mode, Program, parse_status
    from ambert.sw.compiler.gemm import gemm_program
    from ambert.sw.quant.ref import ref_matmul
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    bias = rng.integers(-2**20, 2**20, n)
    m0, shift = rng.integers(1 << 30, 1 << 31, n), np.full(n, 40)
    prog, decode = gemm_program(shape, a, w, bias, m0, shift, Mode.INT8)
    nc = Counters.WORDS
    res = sim.run(Program(shape).counters().words + prog.words + Program(shape).counters().words, prog.expect + 2 * nc)
    busy = Counters.unpack(res.answers[-nc:]).busy - Counters.unpack(res.answers[:nc]).busy
    out, status = decode(res.answers[nc:-nc])
    want = ref_matmul(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias.astype(np.int32)),
                      torch.from_numpy(m0), torch.from_numpy(shift), 8).numpy()
    if parse_status(status) != Error(0) or not np.array_equal(out, want):
        raise RuntimeError(f"a {m}x{k}x{n} GEMM: the device's result differs from the integer reference")
    return busy, res.cycles


def launch_checked(mode, path, model, enc, ranks, **kw):
    """``ambert.sw.parallel.launch`` on simulated devices, its output checked ``==`` ``model``'s integer
    reference: ``(ParallelResult, wall seconds)``."""
    from ambert.sw.parallel import launch
    t0 = time.perf_counter()
    result = launch(mode, path, enc, ranks, device="sim", timeout_s=1800, **kw)
    wall = time.perf_counter() - t0
    if not torch.equal(result.out, model.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])):
        raise RuntimeError(f"{mode} over {ranks} ranks differs from the integer reference")
    return result, wall


MODEL_SHAPES = {"MiniLM": dict(hidden=384, ffn=1536, heads=12), "bert-base": dict(hidden=768, ffn=3072, heads=12)}


def _gemms(seq, hidden, ffn, heads):
    d = hidden // heads
    return [("Q/K/V/O", seq, hidden, hidden), ("FFN1", seq, hidden, ffn), ("FFN2", seq, ffn, hidden),
            ("QK^T (1 head)", seq, d, seq), ("P.V (1 head)", seq, seq, d)]


def acceleration(ctx, sec, step):
    """Array efficiency of each BERT GEMM on the Verilated 16x16 top (useful MACs over array slots while
    the engine ran, from the device's counters; random int8 data, results ``==`` ref_matmul); the whole
    MiniLM on each board configuration's simulated accelerator (cycles, and latency at that board's clock);
    each board's last bitstream report (``make bitstream``); the GPU backend where there is a GPU."""
    import numpy as np
    from ambert.boards import BOARD_NAMES, get_board
    from ambert.hw.config import AcceleratorConfig
    from ambert.proto.isa import DeviceShape
    from ambert.sim.fastsim import FastSim
    s = ctx.settings
    step("array efficiency per GEMM")
    cfg = AcceleratorConfig(DeviceShape(lanes=16, banks=4, bank_words=16384, acc_depth=512))
    sim = FastSim(cfg)
    rng = np.random.default_rng(0)
    t = sec.table("Array efficiency of each BERT GEMM (16x16 array, 128 tokens)", [
        ("model", ""), ("GEMM", ""), ("M x K x N", ""), ("busy cycles", ",d"), ("total cycles", ",d"),
        ("efficiency", ".1%"), ("with transfers", ".1%")],
        note="Busy: the cycles the MATMUL engine ran; total: also moving operands over the 32-bit host stream.")
    eff = []
    for model in s.gemm_models:
        for name, m, k, n in _gemms(128, **MODEL_SHAPES[model]):
            busy, total = run_random_gemm(sim, cfg.shape, m, k, n, rng)
            e = m * k * n / (256 * busy)
            eff.append((f"{model} {name}", e))
            t.add(model, name, f"{m}x{k}x{n}", busy, total, e, m * k * n / (256 * total))
    sim.close()

    b = sec.table("The whole MiniLM on each board configuration's accelerator (simulated)", [
        ("board", ""), ("size", ""), ("array", ""), ("pool KiB", ".0f"), ("clock MHz", ".0f"), ("cycles", ",d"),
        ("engine busy", ".1%"), ("latency ms", ".2f"), ("peak GOPS", ".2f")],
        note=f"One {s.board_seq}-token sequence, transfers over the host stream included (the serial link's own "
             f"time is not: see the link benchmark); output == the integer reference.")
    enc = ctx.batch(1, s.board_seq)
    latency = []
    for board_name in BOARD_NAMES:
        board = get_board(board_name)
        seen = set()
        for size in board.size_names:
            config = board.config(size)
            if config in seen:
                continue                         # a size that is another's configuration under a new name
            seen.add(config)
            step(f"MiniLM on {board_name} {size}")
            shape, clock = config.shape, board.clock(size)
            try:
                stats = _device_cycles(ctx, ctx.qm, enc, config)
            except Exception as e:              # noqa: BLE001 - a configuration that cannot take the model
                sec.absent.append(f"MiniLM on {board_name} {size}: {e}")
                continue
            b.add(board_name, size, f"{shape.lanes}x{shape.lanes}", shape.banks * shape.bank_words * shape.lanes / 1024,
                  clock / 1e6, stats.cycles, stats.busy_cycles / stats.cycles, stats.cycles / clock * 1e3,
                  2 * shape.lanes ** 2 * clock / 1e9)
            latency.append((f"{board_name} {size}", stats.cycles / clock * 1e3))

    from ambert.boards.build import ROOT as BUILD_ROOT
    fit = sec.table("Each board's last bitstream build (`make bitstream`)", [
        ("board", ""), ("size", ""), ("array", ""), ("Fmax MHz", ".1f"), ("needs MHz", ".1f"), ("status", ""),
        ("logic", ""), ("FF", ""), ("DSP", ""), ("BRAM", ""), ("built", "")])
    names = {"ecp5": ("TRELLIS_COMB", "TRELLIS_FF", "MULT18X18D", "DP16KD"),
             "ice40": ("ICESTORM_LC", None, "ICESTORM_DSP", "ICESTORM_RAM")}
    for board_name in BOARD_NAMES:
        board = get_board(board_name)
        for size in board.size_names:
            path = BUILD_ROOT / "build" / "boards" / f"{board_name}-{size}" / "report.json"
            if not path.exists():
                sec.absent.append(f"{board_name} {size} bitstream: not built on this machine "
                                  f"(`make bitstream BOARD={board_name} SIZE={size}`)")
                continue
            import json
            r = json.loads(path.read_text())
            util = r.get("utilization", {})

            def used(key):
                u = util.get(key) if key else None
                return f"{u['used']:,} / {u['available']:,}" if u else "—"
            fmax = min((f["achieved"] for f in r.get("fmax_mhz", {}).values()), default=None)
            need = max((f["constraint"] for f in r.get("fmax_mhz", {}).values()), default=None)
            lanes = r["config"]["shape"]["lanes"]
            fit.add(board_name, size, f"{lanes}x{lanes}", fmax, need, r["status"],
                    *(used(k) for k in names[r["family"]]), r.get("built", "—"))
    fit.note = "Read from build/boards/<board>-<size>/report.json as the last build wrote it (its date in the last column)."
    if not fit.rows:
        sec.tables.remove(fit)                  # no board built here: the absent lines above say so
    sec.figures.append((plots.acceleration(ctx.out, eff, latency), "Array efficiency per GEMM; MiniLM latency per board"))

    if torch.cuda.is_available():
        step("GPU backend")
        from ambert.sw.runtime import offload
        gpu = offload(ctx.teacher, device="gpu", quantized=ctx.qm)
        g = sec.table("GPU backend (CUDA int8)", [("batch", "d"), ("ms", ".2f"), ("== integer reference", "")])
        for batch in (1, 32):
            enc = ctx.batch(batch, 128)
            want = ctx.qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            out = gpu(**enc).last_hidden_state
            best = best_of_interleaved([lambda: (gpu(**enc), torch.cuda.synchronize())], s.reps)[0]
            g.add(batch, best * 1e3, "yes" if torch.equal(out.cpu(), want) else "NO")
    else:
        sec.absent.append("the GPU backend: no CUDA GPU on this machine")
    mean = sum(e for n, e in eff if "head" not in n) / max(1, sum(1 for n, _ in eff if "head" not in n))
    sec.text.append(f"The projection and FFN GEMMs keep the 16x16 array {mean:.1%} busy on average; "
                    f"the per-head attention GEMMs {min(e for n, e in eff if 'head' in n):.1%} at worst.")
    return {"array_eff": (mean, ".1%", "16x16 array efficiency, projection and FFN GEMMs")}


SECTIONS = [("quantization", "Quantization: integer-only int8", quantization),
            ("baselines", "Against what a CPU user would pick instead", baselines),
            ("compression", "Compression: pruning and distillation", compression),
            ("pooling", "Memory pooling", pooling),
            ("parallelism", "Parallelism: data, tensor, pipeline", parallelism),
            ("acceleration", "Acceleration: the FPGA array, boards and GPU", acceleration)]
