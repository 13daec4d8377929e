"""Data and tensor parallelism of the integer BERT over torch.distributed (gloo), bit-exact.

Each rank owns one device chain (any backend: ``sim``, ``board:…``, ``gpu``, ``cpu``, with the runtime's
per-operation fallback) and joins a gloo process group; :func:`launch` starts the ranks on this machine
(``torch.multiprocessing``, a TCP rendezvous on loopback), and a ``torchrun`` launch calls
:func:`run_rank` in each process with the group already set up by the environment.

* **data**: the batch split into contiguous, nearly equal slices, one per rank; each rank runs the whole
  model on its slice; the int16 outputs gathered in order.
* **tensor** (Megatron-style): every layer's attention heads split across ranks (Q, K, V column-parallel
  by heads; scores, softmax and the context per head, as the contract has them) and its FFN neurons split
  in contiguous blocks (FFN1 and GELU column-parallel); the attention output projection and FFN2 are
  row-parallel: each rank's int32 partial sums (its slice of K; the bias on rank 0 only) are summed
  across ranks with ``all_reduce`` before the requantization. Integer sums are exact in any order, and
  every partial sum is bounded by the whole sum's bound, so the result is the single-device result,
  bit for bit. LayerNorm and the residual adds run on every rank on the reduced rows. Heads and
  neurons that do not divide by the ranks are split into blocks one apart in size (no padding: a padded
  head would cost its rank work that changes nothing), so pruned layers of any shape split too; the
  critical path is the rank with the larger block.
* **pipeline**: the layers cut into one stage per rank (equal counts, or ``stages`` given), the batch
  into ``micro_batches``; each micro-batch's hidden states go rank to rank by point-to-point sends while
  the next micro-batch enters the first stage (GPipe's forward schedule).

A rank whose device fails falls back on its next backend (the same bits) and the run completes; a rank
process that dies ends the run with an error naming it, within the group's timeout. For tests,
``AMBERT_RANK_FAULT=RANK:LAYER`` kills rank RANK (SIGKILL, as the OOM killer would) as it starts layer
LAYER, and ``AMBERT_RANK_FAULT=RANK:LAYER:device`` makes that rank's device fail every operation from
then on.
"""

import dataclasses
import os
from datetime import timedelta

import torch

from ambert.sw.compiler.layer import fused_qkv
from ambert.sw.quant.ref import ref_add_layernorm, ref_gelu_requant, ref_heads, ref_requant

__all__ = ["MODES", "shard_layer", "stage_bounds", "tensor_parallel_layer", "run_rank", "launch", "ParallelResult",
           "ParallelError"]

MODES = ("data", "tensor", "pipeline")


@dataclasses.dataclass
class ParallelResult:
    """A run's int16 output, matmuls per backend summed over the ranks, each rank's device cycles, and
    (pipeline) each rank's device cycles per micro-batch."""
    out: torch.Tensor
    ops: dict
    cycles: list
    micro_cycles: list = None


class ParallelError(RuntimeError):
    """A parallel run that cannot start or did not finish: the rank and the reason."""


def _split(n, parts, rank):
    """Rank ``rank``'s contiguous slice of ``n`` items split ``parts`` ways (sizes differ by at most 1)."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclasses.dataclass(frozen=True)
class LayerShard:
    """One rank's part of a layer: its heads' Q/K/V rows and context constants, its FFN neurons, and the
    matching input columns of the row-parallel output projection and FFN2 (biases on rank 0 only)."""
    attn: object            # the LayerParams with this rank's heads (ref_heads takes it)
    wo: torch.Tensor
    bo: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    f1_m0: torch.Tensor
    f1_shift: torch.Tensor
    g_m0: torch.Tensor
    g_shift: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def _rows(x, lo, hi):
    x = torch.as_tensor(x)
    return x[lo:hi].contiguous() if x.dim() else x


def shard_layer(p, rank, world):
    """Rank ``rank``'s :class:`LayerShard` of ``p`` for ``world`` ranks.

    Heads and FFN neurons are split into contiguous blocks whose sizes differ by at most one, so any
    layer splits, pruned ones (whose layers differ) included; a rank left without heads (or neurons)
    contributes zeros to that all-reduce."""
    d = p.wq.shape[0] // p.heads
    h0, h1 = _split(p.heads, world, rank)
    c0, c1 = h0 * d, h1 * d
    attn = None if h1 == h0 else dataclasses.replace(
        p, heads=h1 - h0,
        wq=p.wq[c0:c1].contiguous(), bq=p.bq[c0:c1].contiguous(), q_m0=_rows(p.q_m0, c0, c1),
        q_shift=_rows(p.q_shift, c0, c1),
        wk=p.wk[c0:c1].contiguous(), bk=p.bk[c0:c1].contiguous(), k_m0=_rows(p.k_m0, c0, c1),
        k_shift=_rows(p.k_shift, c0, c1),
        wv=p.wv[c0:c1].contiguous(), bv=p.bv[c0:c1].contiguous(), v_m0=_rows(p.v_m0, c0, c1),
        v_shift=_rows(p.v_shift, c0, c1),
        ctx_m0=_rows(p.ctx_m0, c0, c1), ctx_shift=_rows(p.ctx_shift, c0, c1))
    n0, n1 = _split(p.w1.shape[0], world, rank)
    zeros = torch.zeros_like
    return LayerShard(
        attn=attn,
        wo=p.wo[:, c0:c1].contiguous(), bo=p.bo if rank == 0 else zeros(p.bo),
        w1=p.w1[n0:n1].contiguous(), b1=p.b1[n0:n1].contiguous(), f1_m0=_rows(p.f1_m0, n0, n1),
        f1_shift=_rows(p.f1_shift, n0, n1), g_m0=_rows(p.g_m0, n0, n1), g_shift=_rows(p.g_shift, n0, n1),
        w2=p.w2[:, n0:n1].contiguous(), b2=p.b2 if rank == 0 else zeros(p.b2))


def _bias_only(x, bias):
    """The int32 partial sums of a rank with no share of the GEMM: its bias (zeros off rank 0)."""
    return bias.to(torch.int32).expand(*x.shape[:-1], bias.shape[0]).contiguous()


def _shard_projections(shard):
    """The static GEMMs of a layer's shard in the order they run: (w, bias, m0, shift, bits), None for a
    rank without a share; Q, K and V merged as on one device (``fused_qkv``); the row-parallel ones int32."""
    return [None if shard.attn is None else (*fused_qkv(shard.attn), 8),
            None if shard.attn is None else (shard.wo, shard.bo, 0, 0, None),
            None if shard.w1.shape[0] == 0 else (shard.w1, shard.b1, shard.f1_m0, shard.f1_shift, 16),
            None if shard.w1.shape[0] == 0 else (shard.w2, shard.b2, 0, 0, None)]


def tensor_parallel_layer(x8, x16, p, shard, mask, matmul, all_reduce, expect=None, next_shard=None):
    """One encoder layer, this rank's share of it; returns the full ``(x8, x16)`` on every rank.

    ``matmul`` is a backend's (``Runner``'s) GEMM; ``all_reduce(int32 tensor)`` sums it across ranks in
    place; ``expect``, if given, is told each projection's weights before the one ahead of it runs (the
    next layer's first: ``next_shard``), as on one device, so a device loads them while it computes."""
    qkv, proj_o, ffn1, ffn2 = _shard_projections(shard)
    following = [proj_o, ffn1, ffn2, None if next_shard is None else _shard_projections(next_shard)[0]]
    rows = x8.shape[0] * x8.shape[1]

    def project(x, i, gemm):
        upcoming = next((g for g in following[i:] if g is not None), None)
        if expect is not None and upcoming is not None:
            expect(*upcoming, rows)
        return matmul(x, *gemm)

    a = shard.attn
    if a is None:
        acc = _bias_only(x8, shard.bo)
    else:
        out = project(x8, 0, qkv)
        c = a.wq.shape[0]
        q, k, v = (out[..., i * c:(i + 1) * c].contiguous() for i in range(3))
        ctx = ref_heads(q, k, v, a, mask, matmul=matmul)
        acc = project(ctx, 1, proj_o)                               # int32 partial sums (the bypass)
    all_reduce(acc)
    attn = ref_requant(acc, p.o_m0, p.o_shift, 16)
    h8, h16 = ref_add_layernorm(attn, x16, [p.ln1_x8, p.ln1_x16])
    if ffn1 is None:
        acc2 = _bias_only(h8, shard.b2)
    else:
        f1 = project(h8, 2, ffn1)
        g = ref_gelu_requant(f1, p.gelu, shard.g_m0, shard.g_shift)
        acc2 = project(g, 3, ffn2)
    all_reduce(acc2)
    f2 = ref_requant(acc2, p.f2_m0, p.f2_shift, 16)
    return tuple(ref_add_layernorm(f2, h16, [p.ln2_x8, p.ln2_x16]))


def run_rank(mode, qm, enc, device="cpu", micro_batches=4, stages=None):
    """This rank's part of a ``mode`` run over the default process group; returns the int16 last hidden
    state [B, T, C] (data, tensor: every rank has all of it; pipeline: the last rank, None elsewhere) and
    this rank's device statistics. ``micro_batches`` and ``stages`` (layers per rank) are the pipeline's."""
    import torch.distributed as dist
    from ambert.sw.runtime import Runner, device_chain
    rank, world = dist.get_rank(), dist.get_world_size()
    runner = Runner(device_chain(device))
    fault = os.environ.get("AMBERT_RANK_FAULT", "").split(":")
    fault_at = int(fault[1]) if len(fault) > 1 and int(fault[0]) == rank else None

    def checkpoint(i):
        if i != fault_at:
            return
        if fault[2:] == ["device"]:
            _lose_device(runner.devices[0], rank)
        else:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")
    if mode == "data":
        b0, b1 = _split(ids.shape[0], world, rank)
        pick = (lambda t: None if t is None else t[b0:b1])
        if b1 > b0:
            run_layer = runner.layer_fn(qm.layers)

            def layer_fn(i, *args):
                checkpoint(i)
                return run_layer(i, *args)
            out = qm.forward_int(pick(ids), pick(mask), pick(types), layer_fn=layer_fn)
        else:
            out = torch.zeros((0, ids.shape[1], qm.config["hidden"]), dtype=torch.int16)
        # gather: every slice padded to the largest, then cut back
        rows = _split(ids.shape[0], world, 0)[1]
        padded = torch.zeros((rows, *out.shape[1:]), dtype=torch.int32)      # gloo gathers int32
        padded[:out.shape[0]] = out
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        sizes = [_split(ids.shape[0], world, r) for r in range(world)]
        full = torch.cat([parts[r][:hi - lo] for r, (lo, hi) in enumerate(sizes)]).to(torch.int16)
        return full, runner.collect_stats()
    if mode == "tensor":
        shards = [shard_layer(p, rank, world) for p in qm.layers]
        matmul = runner._matmul_from(0)

        def all_reduce(t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

        expect = getattr(runner.devices[0], "expect", None)

        def layer_fn(i, x8, x16, m):
            checkpoint(i)
            return tensor_parallel_layer(x8, x16, qm.layers[i], shards[i], m, matmul, all_reduce, expect,
                                         shards[i + 1] if i + 1 < len(shards) else None)
        return qm.forward_int(ids, mask, types, layer_fn=layer_fn), runner.collect_stats()
    if mode == "pipeline":
        out, micro_cycles = _pipeline_rank(qm, enc, runner, checkpoint, micro_batches, stages)
        stats = runner.collect_stats()
        stats.micro_cycles = micro_cycles
        return out, stats
    raise ValueError(f"unknown parallel mode {mode!r}: one of {', '.join(MODES)}")


def _lose_device(dev, rank):
    """The test hook's device failure: from now on every operation on ``dev`` fails, as a board pulled
    out would."""
    from ambert.sw.runtime import DeviceError

    def lost(*_args, **_kwargs):
        raise DeviceError(f"{dev.name} on rank {rank} is gone (AMBERT_RANK_FAULT)")
    dev.matmul = lost


def stage_bounds(layers, world, stages=None):
    """The layers of each of ``world`` stages: ``stages`` given (layer counts, summing to ``layers``) or
    split as evenly as layers go (a BERT's layers all cost the same, so equal counts balance)."""
    if stages is None:
        return [_split(layers, world, r) for r in range(world)]
    if len(stages) != world or sum(stages) != layers or min(stages) < 1:
        raise ValueError(f"stages {list(stages)} must give each of the {world} ranks at least one of the "
                         f"{layers} layers, all of them")
    ends = [sum(stages[:r + 1]) for r in range(world)]
    return [(e - n, e) for e, n in zip(ends, stages)]


def _pipeline_rank(qm, enc, runner, checkpoint, micro_batches, stages):
    """GPipe's forward schedule on point-to-point sends: rank r runs its stage on micro-batch i while rank
    r + 1 runs micro-batch i - 1. Inference has no backward pass, so GPipe's and 1F1B's forward orders are
    the same; blocking send/recv (gloo's isend/irecv pairs are where its known hangs are) carry each
    micro-batch's int8 and int16 hidden states. Returns (the output on the last rank, None on the others;
    this rank's device cycles per micro-batch)."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")
    lo, hi = stage_bounds(len(qm.layers), world, stages)[rank]
    run_layer = runner.layer_fn(qm.layers)
    n = ids.shape[0]
    m = max(1, min(micro_batches, n))
    outs, micro_cycles = [], []
    for i in range(m):
        before = runner.collect_stats().cycles
        b0, b1 = _split(n, m, i)
        mb_mask = None if mask is None else mask[b0:b1].to(torch.bool)
        shape = (b1 - b0, ids.shape[1], qm.config["hidden"])
        if rank == 0:
            qm.check_inputs(ids[b0:b1], None if mask is None else mask[b0:b1],
                            None if types is None else types[b0:b1])
            x8, x16 = qm.embed(ids[b0:b1], None if types is None else types[b0:b1])
        else:
            x8, x16 = torch.empty(shape, dtype=torch.int8), torch.empty(shape, dtype=torch.int16)
            dist.recv(x8, src=rank - 1)
            dist.recv(x16, src=rank - 1)
        for layer in range(lo, hi):
            checkpoint(layer)
            x8, x16 = run_layer(layer, x8, x16, mb_mask)
        micro_cycles.append(runner.collect_stats().cycles - before)
        if rank < world - 1:
            dist.send(x8.contiguous(), dst=rank + 1)
            dist.send(x16.contiguous(), dst=rank + 1)
        else:
            outs.append(x16)
    return (torch.cat(outs) if outs else None), micro_cycles


def _worker(rank, world, port, mode, artifact_path, enc, device, result_path, timeout_s, micro_batches, stages):
    import torch.distributed as dist
    from ambert.sw.quant import artifact
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        qm = artifact.load(artifact_path)
        out, stats = run_rank(mode, qm, enc, device, micro_batches, stages)
        torch.save({"out": out, "ops": dict(stats.ops), "cycles": stats.cycles,
                    "micro_cycles": getattr(stats, "micro_cycles", None)}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def launch(mode, artifact_path, enc, ranks, device="cpu", timeout_s=120, micro_batches=4, stages=None):
    """Run ``mode`` over ``ranks`` processes on this machine; return a :class:`ParallelResult`. Raises
    :class:`ParallelError` naming a rank that failed or died."""
    import socket
    import torch.multiprocessing as mp
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}: one of {', '.join(MODES)}")
    if ranks < 1:
        raise ValueError(f"--ranks must be at least 1, not {ranks}")
    if micro_batches < 1:
        raise ValueError(f"--micro-batches must be at least 1, not {micro_batches}")
    if mode == "pipeline":
        from ambert.sw.quant.artifact import read_header
        stage_bounds(read_header(artifact_path)["config"]["layers"], ranks, stages)     # refuse bad stages now
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ambert-parallel-") as tmp:
        result_path = os.path.join(tmp, "rank0.pt")
        try:
            mp.start_processes(_worker, args=(ranks, port, mode, str(artifact_path), dict(enc), device, result_path,
                                              timeout_s, micro_batches, stages),
                               nprocs=ranks, join=True, start_method="spawn")
        except mp.ProcessExitedException as e:
            raise ParallelError(f"rank {e.error_index} died (exit code {e.exit_code}); the run is void") from None
        except mp.ProcessRaisedException as e:
            why = str(e).strip().splitlines()[-1]
            raise ParallelError(f"rank {e.error_index} failed: {why}") from None
        results = [torch.load(f"{result_path}.{r}") for r in range(ranks)]
    out = next(r["out"] for r in results if r["out"] is not None)
    ops = {}
    for r in results:
        for name, count in r["ops"].items():
            ops[name] = ops.get(name, 0) + count
    micro = [r["micro_cycles"] for r in results] if mode == "pipeline" else None
    return ParallelResult(out, ops, [r["cycles"] for r in results], micro)


def main(argv=None):
    """``torchrun --nproc-per-node N -m ambert.sw.parallel --mode tensor "a sentence" …``: one rank per
    process, the group from torchrun's environment (its standard rendezvous, one machine or several);
    rank 0 prints each sentence's embedding norm check and the similarity table."""
    import argparse
    import sys
    import torch.distributed as dist
    from ambert.sw.quant import artifact
    from ambert.sw.quant.hf import encode, load_tokenizer, mean_pool
    p = argparse.ArgumentParser(prog="torchrun ... -m ambert.sw.parallel", description=main.__doc__.split("\n")[0])
    p.add_argument("sentences", nargs="+")
    p.add_argument("--mode", choices=MODES, default="tensor")
    p.add_argument("--artifact", default="build/all-MiniLM-L6-v2.ambert.safetensors")
    p.add_argument("--model", help="the model folder the artifact came from (for its tokenizer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout-s", type=int, default=120)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("start it with torchrun (or use `ambert run --parallel MODE --ranks N`)")
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        qm = artifact.load(args.artifact)
        enc = encode(load_tokenizer(args.model), args.sentences, max_length=qm.config["max_positions"])
        out, stats = run_rank(args.mode, qm, enc, args.device)
        if out is not None and (args.mode == "pipeline" or dist.get_rank() == 0):
            emb = mean_pool(out.to(torch.float32) * qm.out_scale, enc["attention_mask"])
            sim = emb @ emb.T
            print(f"{args.mode} parallel over {dist.get_world_size()} ranks of {args.device}")
            for i, s in enumerate(args.sentences):
                print(" ".join(f"{v:6.3f}" for v in sim[i].tolist()), " ", s[:48])
    except (ValueError, RuntimeError, OSError) as e:
        print(f"rank {dist.get_rank()}: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
