"""The ``ambert`` command: quantize a Hugging Face BERT, inspect the artifact, run it, and the demo."""

import argparse
import sys
import time
from pathlib import Path

DEFAULT_ARTIFACT = Path("build") / "all-MiniLM-L6-v2.ambert.safetensors"

DEMO_SENTENCES = [
    "The cat sat on the mat.",
    "A kitten was resting on the rug.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Investors worry that inflation will stay high next year.",
    "How do I reset my password?",
    "Quantized transformers run well on small FPGAs.",
]


def _load_or_quantize(artifact, model_dir, progress=True):
    """Return the QuantizedBert in ``artifact``, quantizing ``model_dir`` into it first if it is absent."""
    from ambert.sw.quant import artifact as art
    from ambert.sw.quant.quantize import quantize_pretrained
    artifact = Path(artifact)
    if artifact.exists():
        return art.load(artifact)
    print(f"quantizing {model_dir or 'the bundled all-MiniLM-L6-v2'} -> {artifact}", file=sys.stderr)
    qm, _, _ = quantize_pretrained(model_dir, progress=progress)
    art.save(qm, artifact)
    return qm


def cmd_quantize(args):
    from ambert.sw.quant import artifact as art
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    calibration = read_sentences(args.calibration) if args.calibration else None
    t0 = time.perf_counter()
    qm, _, _ = quantize_pretrained(args.model, calibration, progress=not args.quiet)
    path = art.save(qm, args.output)
    cfg = qm.config
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {cfg['layers']} layers, hidden {cfg['hidden']}, "
          f"{cfg['heads']} heads, FFN {cfg['intermediate']}; {time.perf_counter() - t0:.1f} s")
    return 0


def _granularity(text):
    from ambert.sw.quant.prune import GRANULARITIES
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in GRANULARITIES]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(GRANULARITIES)}")
    return parts


def _fraction(text):
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): the fraction of encoder MACs to remove")
    return f


def cmd_prune(args):
    from ambert.sw.quant import artifact as art
    from ambert.sw.quant.prune import prune_pretrained
    from ambert.sw.quant.quantize import read_sentences
    calibration = read_sentences(args.calibration) if args.calibration else None
    t0 = time.perf_counter()
    qm, _, _ = prune_pretrained(args.fraction, args.granularity, args.model, calibration, args.seq, args.lanes,
                                progress=not args.quiet, tile_share=args.tile_share,
                                **({} if args.layer_floor is None else dict(floor=args.layer_floor)))
    output = args.output or DEFAULT_ARTIFACT.with_name(
        DEFAULT_ARTIFACT.name.replace(".ambert", f".pruned{round(args.fraction * 100)}.ambert"))
    path = art.save(qm, output)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); {time.perf_counter() - t0:.1f} s")
    print(_pruning_line(qm.config, qm.source))
    return 0


def cmd_distill(args):
    from ambert.sw.quant import artifact as art
    from ambert.sw.quant.distill import DistillConfig, distill_artifact
    from ambert.sw.quant.quantize import read_sentences
    artifact = Path(args.artifact)
    art.read_header(artifact)                           # refuse a bad artifact before loading any model
    output = args.output or artifact.with_name(artifact.name.replace(".ambert", ".distilled.ambert")
                                               if ".ambert" in artifact.name else f"distilled-{artifact.name}")
    checkpoint = args.checkpoint or output.with_name(output.name + ".ckpt")
    calibration = read_sentences(args.calibration) if args.calibration else None
    dc = DistillConfig(**{k: v for k, v in dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
                          .items() if v is not None})          # unset: the recipe's
    t0 = time.perf_counter()
    try:
        qm, _, _ = distill_artifact(artifact, args.model, dc, checkpoint, calibration, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\nambert: interrupted; run the same command again to resume from the last checkpoint "
              f"({checkpoint}, every {dc.checkpoint_every} steps)", file=sys.stderr)
        return 130
    path = art.save(qm, output)
    ds = qm.source["distillation"]
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); {ds['steps']} steps on {ds['sentences']} "
          f"sentences, final loss {ds['loss']:.4f}, training cosine {ds['train_cos']:.4f}; "
          f"{time.perf_counter() - t0:.0f} s")
    Path(checkpoint).unlink(missing_ok=True)            # done: the artifact holds everything it held
    return 0


def _pruning_line(cfg, src):
    from ambert.sw.quant.model import MACS_SEQ, encoder_macs, layer_dims
    pr = src.get("pruning")
    if pr is None:
        return f"  MACs    {encoder_macs(cfg) / 1e6:.1f} M per {MACS_SEQ}-token sequence (dense)"
    dims = layer_dims(cfg)
    left = encoder_macs(cfg, pr["macs_seq"])
    tiles = ""
    if "tiles_zeroed" in pr:
        left -= pr["tile_macs_removed"]
        tiles = f", {pr['tiles_zeroed']} weight tiles of {pr['lanes']}x{pr['lanes']} zeroed (not stored, not computed)"
    floor = (f", each layer keeping {pr['layer_min_share']:.0%} of its MACs at least" if pr.get("layer_min_share")
             else "")
    return (f"  pruned  {pr['fraction']:.0%} of encoder MACs asked ({', '.join(pr['granularity'])}{floor}): "
            f"{pr['heads_removed']} heads and {pr['neurons_removed']} FFN neurons removed{tiles}; "
            f"{left / 1e6:.1f} M MACs left of {pr['dense_macs'] / 1e6:.1f} M ({left / pr['dense_macs']:.1%}) "
            f"per {pr['macs_seq']}-token sequence\n"
            f"          heads per layer {[h for h, _ in dims]}, FFN neurons per layer {[f for _, f in dims]}")


def cmd_info(args):
    from ambert.sw.quant import artifact as art
    header = art.read_header(args.artifact)
    art.load(args.artifact)             # validate the data too, not only the header
    cfg, src = header["config"], header["source"]
    print(f"{args.artifact}: {header['format']} v{header['version']}, checksum ok")
    print(f"  model   {src.get('name')} ({src.get('model')})")
    print(f"  shape   {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, FFN "
          f"{cfg['intermediate']}, vocab {cfg['vocab']}, {cfg['max_positions']} positions")
    print(f"  calib   {src.get('calibration_sentences')} sentences, {src.get('quant_config')}")
    print(_pruning_line(cfg, src))
    if "distillation" in src:
        ds = src["distillation"]
        print(f"  distill {ds['steps']} steps on {ds['sentences']} sentences of the {ds['corpus']}, final "
              f"loss {ds['loss']:.4g}, training cosine {ds['train_cos']:.4f}")
    print(f"  tensors {len(header['tensors'])}, constants {len(header['constants'])}")
    return 0


def _similarity_table(names, sim):
    lines = ["      " + " ".join(f"{j:>6}" for j in range(len(names)))]
    for i, row in enumerate(sim.tolist()):
        lines.append(f"  [{i}] " + " ".join(f"{v:6.3f}" for v in row) + f"  {names[i][:48]}")
    return "\n".join(lines)


def _run_parallel(args, qm, enc):
    """``ambert run --parallel MODE --ranks N``: the ranks as processes on this machine (sw/parallel.py)."""
    import torch
    from ambert.sw.parallel import ParallelError, launch
    from ambert.sw.quant.hf import mean_pool
    if args.waves:
        raise ValueError("--waves takes one device: leave out --parallel")
    t0 = time.perf_counter()
    try:
        result = launch(args.parallel, args.artifact, dict(enc), args.ranks, args.device,
                        micro_batches=args.micro_batches)
        x16, ops, cycles = result.out, result.ops, result.cycles
    except ParallelError as e:
        raise RuntimeError(str(e)) from None
    dt = time.perf_counter() - t0
    emb = mean_pool(x16.to(torch.float32) * qm.out_scale, enc["attention_mask"])
    ran = ", ".join(f"{n}: {k} GEMMs" for n, k in ops.items())
    counted = f"; device cycles per rank {', '.join(f'{c:,}' for c in cycles)}" if any(cycles) else ""
    print(f"{args.parallel} parallel over {args.ranks} ranks of {args.device} ({ran}{counted}): "
          f"{len(args.sentences)} sentences, {dt * 1e3:.0f} ms wall with the ranks' start")
    print("cosine similarity of the integer model's embeddings:")
    print(_similarity_table(args.sentences, emb @ emb.T))
    return 0


def cmd_run(args):
    import torch
    from ambert.sw.quant.hf import check_text, encode, load_bert, load_tokenizer, mean_pool
    from ambert.sw.runtime import OffloadedBert, device_chain
    for i, sentence in enumerate(args.sentences):
        check_text(sentence, f"sentence argument {i + 1}")
    qm = _load_or_quantize(args.artifact, args.model)
    tok = load_tokenizer(args.model)
    if tok.vocab_size != qm.config["vocab"]:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but {args.artifact} was quantized for "
                         f"{qm.config['vocab']}: pass the --model the artifact came from")
    enc = encode(tok, args.sentences, max_length=qm.config["max_positions"])
    if args.device == "sim":
        print("building / loading the Verilated accelerator (first run: a few minutes)...", file=sys.stderr)
    model_cfg = load_bert(args.model).config if args.model else None
    if args.waves and args.device != "sim":
        raise ValueError("--waves needs --device sim")
    extra = {"waves": args.waves} if args.waves else {}
    if args.parallel:
        return _run_parallel(args, qm, enc)
    mod = OffloadedBert(qm, model_cfg, device_chain(args.device, **extra), progress=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = mod(**enc).last_hidden_state
    dt = time.perf_counter() - t0
    emb = mean_pool(hidden, enc["attention_mask"])
    st = mod.last_stats
    ran = ", ".join(f"{n}: {k} GEMMs" for n, k in st.ops.items()) or "cpu"
    print(f"device {args.device} ({ran}): {len(args.sentences)} sentences, "
          f"{int(enc['attention_mask'].sum())} tokens, {dt * 1e3:.0f} ms wall")
    if st.recovered:
        print(f"{st.recovered} GEMM program(s) failed once and ran again after a device reset")
    if st.cycles:
        print(f"accelerator: {st.cycles:,} cycles ({st.busy_cycles:,} computing), array efficiency "
              f"{st.efficiency:.1%} while computing, {st.overall_efficiency:.1%} overall, "
              f"{st.host_words * 4 / 2**20:.1f} MiB over the host link, "
              f"{st.latency_s(100e6) * 1e3:.1f} ms modeled at 100 MHz")
    elif st.busy_cycles:        # a board counts its busy cycles; its wall clock is the link's
        print(f"accelerator: {st.busy_cycles:,} cycles computing at {st.efficiency:.1%} array efficiency, "
              f"{st.host_words * 4 / 2**20:.1f} MiB over the link")
    print("cosine similarity of the integer model's embeddings:")
    print(_similarity_table(args.sentences, emb @ emb.T))
    return 0


def cmd_demo(args):
    import torch
    from tqdm import tqdm
    from ambert.sw.quant.fidelity import measure
    from ambert.sw.quant.hf import encode, load_bert, load_tokenizer, mean_pool
    from ambert.sw.quant.ref import ref_layer
    from ambert.sw.runtime import Runner, device_chain
    qm = _load_or_quantize(args.artifact, None)
    model, tok = load_bert(), load_tokenizer()
    sentences = DEMO_SENTENCES
    enc = encode(tok, sentences, max_length=qm.config["max_positions"])
    mask = enc["attention_mask"].bool()
    if args.device == "sim":
        print("building / loading the Verilated 16x16 accelerator (first run: a few minutes)...", file=sys.stderr)
    runner = Runner(device_chain(args.device))
    run_layer = runner.layer_fn(qm.layers)
    # layer by layer on the device, each output checked against the integer reference: the contract
    x8, x16 = qm.embed(enc["input_ids"], enc["token_type_ids"])
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(len(qm.layers)), desc=f"layers on {args.device}", unit="layer", leave=False):
            ref8, ref16 = ref_layer(x8, x16, qm.layers[i], mask)
            x8, x16 = run_layer(i, x8, x16, mask)
            if not (torch.equal(x8, ref8) and torch.equal(x16, ref16)):
                raise RuntimeError(f"layer {i} on {args.device} differs from the integer reference")
    dt = time.perf_counter() - t0
    stats = runner.collect_stats()
    emb = mean_pool(x16.to(torch.float32) * qm.out_scale, enc["attention_mask"])
    fid = measure(model, qm, tok, sentences)
    ran = ", ".join(f"{n}: {k}" for n, k in stats.ops.items())
    print(f"all-MiniLM-L6-v2, integer-only, on {args.device} ({ran} GEMMs): every layer's output == the "
          f"integer reference ({len(qm.layers)} layers, {len(sentences)} sentences, {dt:.1f} s)")
    if stats.cycles:
        print(f"accelerator: {stats.cycles:,} cycles, {stats.busy_cycles:,} of them computing at "
              f"{stats.efficiency:.1%} array efficiency ({stats.overall_efficiency:.1%} of all cycles, transfers "
              f"included); {stats.host_words * 4 / 2**20:.1f} MiB over the host "
              f"link; {stats.latency_s(100e6) * 1e3:.1f} ms modeled at 100 MHz")
    print("\n  cos(int, fp32)  sentence")
    for s, c in zip(sentences, fid.cosines.tolist()):
        print(f"  {c:14.5f}  {s}")
    print("\nsimilarities, integer model:")
    print(_similarity_table(sentences, emb @ emb.T))
    print("\nsimilarities, FP32 model:")
    print(_similarity_table(sentences, fid.fp32_embeddings @ fid.fp32_embeddings.T))
    worst = min(((n, d[n], i) for i, d in enumerate(fid.sqnr) for n in d), key=lambda x: x[1])
    print(f"\nfidelity vs FP32 on these {len(sentences)} sentences: mean_cos={fid.mean_cos:.5f} "
          f"min_cos={fid.min_cos:.5f} spearman={fid.spearman:.5f}; weakest tensor: layer {worst[2]} "
          f"{worst[0]} at {worst[1]:.1f} dB SQNR")
    print("(full benchmark over 206 sentences: python benchmarks/fidelity.py)")
    return 0


def _served_model(spec, fp32=False):
    """``NAME=ARTIFACT[:MODEL_DIR]`` -> ServedModel."""
    from ambert.sw.server import ServedModel
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise ValueError(f"--model-artifact {spec!r}: write NAME=ARTIFACT or NAME=ARTIFACT:MODEL_FOLDER")
    artifact, _, model_dir = rest.partition(":")
    return ServedModel(name, artifact, model_dir or None, fp32=fp32)


def cmd_serve(args):
    from ambert.sw.server import ServedModel, ServerConfig, serve
    if args.model_artifact:
        models = [_served_model(spec, args.baseline_fp32) for spec in args.model_artifact]
    else:
        _load_or_quantize(DEFAULT_ARTIFACT, None)
        models = [ServedModel("all-MiniLM-L6-v2", str(DEFAULT_ARTIFACT), fp32=args.baseline_fp32)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {names}")
    for m in models:
        if not Path(m.artifact).is_file():
            raise ValueError(f"model {m.name!r}: artifact {m.artifact} does not exist (make one with "
                             f"`ambert quantize`)")
    for flag, value in (("--max-batch", args.max_batch), ("--workers", args.workers),
                        ("--queue-limit", args.queue_limit)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, not {value}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise ValueError(f"--memory-budget must be a positive number of bytes, not {args.memory_budget}")
    config = ServerConfig(models, device=args.device, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                          queue_limit=args.queue_limit, memory_budget=args.memory_budget)
    print(f"ambert serve: http://{args.host}:{args.port} ({args.workers} worker(s)); POST /embed, "
          f"/v1/embeddings; GET /health, /metrics", flush=True)
    serve(config, args.host, args.port, args.workers)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="ambert", description="Integer-only BERT for FPGA accelerators.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face BERT folder into an ambert artifact")
    q.add_argument("--model", type=Path, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    q.add_argument("--calibration", type=Path, help="calibration sentences, one per line")
    q.add_argument("-o", "--output", type=Path, default=DEFAULT_ARTIFACT, help=f"default: {DEFAULT_ARTIFACT}")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    pr = sub.add_parser("prune", help="remove attention heads, FFN neurons and weight tiles, then quantize what "
                                      "is left")
    pr.add_argument("--fraction", type=_fraction, required=True,
                    help="fraction of encoder MACs to remove, in [0, 1)")
    pr.add_argument("--granularity", type=_granularity, default=("heads", "neurons"),
                    help="what may be removed: any of heads, neurons, tiles (default: heads,neurons)")
    pr.add_argument("--tile-share", type=float, default=0.5,
                    help="with tiles and heads or neurons: the tiles' share of the MACs removed (default: 0.5)")
    pr.add_argument("--layer-floor", type=float,
                    help="each layer keeps at least this times the share of MACs the model keeps, in [0, 1) "
                         "(default: `ambert.sw.quant.prune.LAYER_FLOOR`, 0.75)")
    pr.add_argument("--model", type=Path, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    pr.add_argument("--calibration", type=Path, help="sentences to score and calibrate on, one per line")
    pr.add_argument("--seq", type=int, default=128, help="sequence length the MACs are counted at (default: 128)")
    pr.add_argument("--lanes", type=int, default=16,
                    help="neurons go in blocks of this many, tiles are this wide: the array's width (default: 16)")
    pr.add_argument("-o", "--output", type=Path,
                    help="default: build/all-MiniLM-L6-v2.prunedNN.ambert.safetensors")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_prune)

    ds = sub.add_parser("distill", help="train a pruned model on its FP32 teacher's outputs, then quantize it")
    ds.add_argument("artifact", type=Path, help="the artifact `ambert prune` wrote (or any artifact of the model)")
    ds.add_argument("--model", type=Path, help="the teacher's folder (default: the bundled all-MiniLM-L6-v2)")
    ds.add_argument("--steps", type=int, help="training steps (default: the recipe's, `ambert.sw.quant.distill."
                    "DistillConfig`)")
    ds.add_argument("--batch", type=int, help="sentences per step (default: the recipe's)")
    ds.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    ds.add_argument("--seed", type=int, help="the order of the training sentences (default: the recipe's)")
    ds.add_argument("--calibration", type=Path, help="calibration sentences for the final quantization")
    ds.add_argument("--checkpoint", type=Path,
                    help="resumable state, written every 100 steps (default: OUTPUT.ckpt; removed when done)")
    ds.add_argument("-o", "--output", type=Path, help="default: the artifact's name with .distilled")
    ds.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ds.set_defaults(func=cmd_distill)

    i = sub.add_parser("info", help="validate an artifact and describe it")
    i.add_argument("artifact", type=Path)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("run", help="embed sentences with the integer model")
    r.add_argument("sentences", nargs="+")
    r.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    r.add_argument("--model", type=Path, help="model folder the artifact came from (for its tokenizer)")
    r.add_argument("--device", default="auto",
                   help="sim (the Verilated accelerator), board:PORT[@BAUD] (a dev board or a virtual one, "
                        "docs/link.md), gpu, cpu, or auto (default: the board in $AMBERT_BOARD, else the GPU "
                        "if present, else CPU)")
    r.add_argument("--parallel", choices=["data", "tensor", "pipeline"],
                   help="spread the run over --ranks processes on this machine, each with its own --device "
                        "(torch.distributed, gloo): the batch split (data), every layer's heads and FFN "
                        "neurons (tensor), or the layers in stages with micro-batches (pipeline); the same "
                        "bits as one device")
    r.add_argument("--ranks", type=int, default=2, help="ranks for --parallel (default: 2)")
    r.add_argument("--micro-batches", type=int, default=4, help="micro-batches for --parallel pipeline")
    r.add_argument("--waves", type=Path, metavar="OUT.vcd|OUT.fst",
                   help="with --device sim: dump every cycle of the accelerator (FST needs liblz4-dev)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="serve embeddings over HTTP (text-embeddings-inference's /embed and "
                                     "/v1/embeddings)")
    s.add_argument("--model-artifact", action="append", metavar="NAME=ARTIFACT[:MODEL_FOLDER]",
                   help="a model to serve, by name (repeat for several; default: the bundled MiniLM as "
                        "'all-MiniLM-L6-v2', quantized first if need be)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--device", default="cpu", help="sim, board:PORT[@BAUD], gpu, cpu or auto (default: cpu)")
    s.add_argument("--workers", type=int, default=1, help="processes, sharing the mapped weights")
    s.add_argument("--max-batch", type=int, default=32, help="sentences per batch (default: 32)")
    s.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="with the device free, how long a request waits for others to batch with (default: "
                        "0; while a batch runs, the next gathers anyway)")
    s.add_argument("--queue-limit", type=int, default=1024,
                   help="sentences queued before new requests get 503 (default: 1024)")
    s.add_argument("--memory-budget", type=int, metavar="BYTES",
                   help="bytes of model weights mapped at once; models past it are evicted least recently used")
    s.add_argument("--baseline-fp32", action="store_true",
                   help="serve each model's Hugging Face FP32 original instead (its MODEL_FOLDER; a baseline "
                        "for benchmarks/serve.py)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run the bundled MiniLM on the simulated accelerator, check it, compare with FP32")
    d.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    d.add_argument("--device", default="sim",
                   help="sim (default: the Verilated accelerator), board:PORT[@BAUD], gpu, cpu or auto")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    from ambert.sw.quant.artifact import ArtifactError
    from ambert.sw.quant.hf import ModelError
    from ambert.sw.quant.model import InputError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ArtifactError, ModelError, InputError, ValueError, FileNotFoundError, RuntimeError) as e:
        # DeviceError is a RuntimeError: a device that fails with no fallback left lands here too
        print(f"ambert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
