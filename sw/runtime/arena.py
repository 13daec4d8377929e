"""The host's activation arena: one encoder layer on the CPU without allocating its activations.

Every tensor a layer makes — the merged Q/K/V projection, the float32 copies the exact GEMM path reads,
scores, probabilities, the context, the residual sums and LayerNorm outputs, the FFN's activations, and
the GEMMs' float32 and int32 scratch (a float32 GEMM runs in row chunks, each requantized as it is made,
so its scratch is one chunk's) — is a view into one buffer, placed by liveness: the layer's
dataflow is a fixed sequence of steps, each tensor lives over a set of them, and two tensors share
bytes only when their sets do not meet (:func:`plan`). Layers and calls reuse the buffer; it grows only
when a larger batch, sequence or layer arrives, so a server that has seen its largest batch allocates no
activation memory again. The layer outputs alternate between two further buffers (a layer's input is the
previous layer's output); the last layer's come back as new tensors, since the caller keeps them.

The arithmetic is the contract's, through the fused CPU kernels of :func:`ambert.sw.quant.ref.ref_layer`
(:mod:`ambert.sw.quant.fused`) on constants prepared once per layer (:func:`layer_constants`), and the
same exact GEMM paths (``torch._int_mm`` where the probe shows this CPU's kernel exact and fast, else
float32 over K-chunks of at most ``F32_EXACT_K``): the bits are ``ref_layer``'s. Two steps are fused further, each
intermediate kept in registers at the width the contract gives it: the scores' requantization with the
softmax (the probabilities written over the scores, as the float32 P.V reads them), and FFN1's
requantization with the GELU. A layer whose constants the kernels do not take runs through ``ref_layer``.
"""

import threading
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ambert.sw.compiler.layer import fused_qkv
from ambert.sw.quant import ref

__all__ = ["ALIGN", "plan", "ActivationArena", "LayerConstants", "layer_constants"]

ALIGN = 64              # bytes: every tensor starts on a cache line

# the steps of one layer, in order; a tensor lives over the steps that write or read it
QKV, QKV_F32, SCORES, SOFTMAX, PV_F32, PV, CTX_Q, MERGE, PROJ_O, LN1, FFN1, FFN2, LN2 = range(13)
GEMM_STEPS = frozenset({QKV, PROJ_O, FFN1, FFN2})
LN = (ref.LN_NORM_BITS, ref.LN_STD_EXTRA_BITS, 1 << 17)     # the fused LayerNorm's constants, as ref passes them


def plan(specs):
    """Offsets for ``specs``, ``(name, bytes, steps)`` triples: two tensors overlap only if their step sets
    are disjoint. Largest first, each at the lowest aligned offset free of every placed tensor it meets.
    Returns ``({name: offset}, total bytes)``."""
    placed, offsets = [], {}
    for name, nbytes, steps in sorted(specs, key=lambda s: (-s[1], s[0])):
        size = -(-nbytes // ALIGN) * ALIGN
        off = 0
        for lo, hi in sorted((o, o + sz) for o, sz, st in placed if st & steps):
            if off + size <= lo:
                break
            off = max(off, hi)
        placed.append((off, size, steps))
        offsets[name] = off
    return offsets, max((o + sz for o, sz, _ in placed), default=0)


GEMM_CHUNK_BYTES = 1 << 22      # a float32 GEMM runs in row chunks whose product fits this


def gemm_rows(r, n_max, int8_gemms):
    """The rows of one GEMM chunk: on the int8 kernel all ``r`` (its int32 output is all the scratch, and
    one call is fastest); on the float32 path as many as keep a [rows, n_max] product within
    :data:`GEMM_CHUNK_BYTES` (its int8 operand's float32 copy, product and int32 sum are then a chunk's,
    not three times the whole product), a multiple of 16, at least 16 and at most ``r``."""
    if int8_gemms:
        return max(r, 1)
    return max(1, min(r, max(16, GEMM_CHUNK_BYTES // (4 * n_max) // 16 * 16)))


def _specs(b, t, c, cq, heads, ffn, int8_gemms):
    """The tensors of one layer: ``(name, dtype, shape, steps)``; the float32 GEMM scratch only where
    the GEMMs do not all run on the int8 kernel (``int8_gemms``). The GEMMs' scratch holds one row chunk
    (:func:`gemm_rows`), not the whole product."""
    r, d = b * t, cq // heads
    k_max = max(c, cq, ffn)
    n_max = max(3 * cq, c, ffn)
    rows = gemm_rows(r, n_max, int8_gemms)
    att = (b, heads, t, t)
    return [
        ("qkv", torch.int8, (r, 3 * cq), frozenset(range(QKV, PV_F32 + 1))),
        ("q_f32", torch.float32, (b, heads, t, d), frozenset({QKV_F32, SCORES})),
        ("k_f32", torch.float32, (b, heads, t, d), frozenset({QKV_F32, SCORES})),
        # the scores, then (the softmax writes each row over itself) the probabilities P.V reads
        ("scores_f32", torch.float32, att, frozenset(range(SCORES, PV + 1))),
        ("v_f32", torch.float32, (b, heads, t, d), frozenset({PV_F32, PV})),
        ("ctx_f32", torch.float32, (b, heads, t, d), frozenset({PV, CTX_Q})),
        ("ctx_heads", torch.int8, (b, heads, t, d), frozenset({CTX_Q, MERGE})),
        ("ctx", torch.int8, (r, cq), frozenset({MERGE, PROJ_O})),
        ("attn", torch.int16, (r, c), frozenset({PROJ_O, LN1})),
        ("h8", torch.int8, (r, c), frozenset({LN1, FFN1})),
        ("h16", torch.int16, (r, c), frozenset(range(LN1, LN2 + 1))),
        ("g", torch.int8, (r, ffn), frozenset({FFN1, FFN2})),
        ("f2", torch.int16, (r, c), frozenset({FFN2, LN2})),
        # the GEMMs' scratch, one row chunk at the largest of the four
        ("gemm_acc", torch.int32, (rows * n_max,), GEMM_STEPS),
    ] + ([] if int8_gemms else [
        ("gemm_a", torch.float32, (rows * k_max,), GEMM_STEPS),
        ("gemm_w", torch.float32, (n_max * k_max,), GEMM_STEPS),
        ("gemm_prod", torch.float32, (rows * n_max,), GEMM_STEPS),
    ])


class _Views:
    """Each tensor of a layer as a view of the storage, and (``np``) the same memory as numpy arrays, 2-D
    [rows, channels] where the fused kernels read and write rows."""

    def __init__(self, storage, specs, offsets):
        self.np = SimpleNamespace()
        for name, dtype, shape, _ in specs:
            start = offsets[name]
            t = storage[start:start + _numel(shape) * dtype.itemsize].view(dtype).view(shape)
            setattr(self, name, t)
            setattr(self.np, name, t.numpy())


class ActivationArena:
    """The buffers one thread's CPU layers run in (see the module's docstring). ``nbytes``: the bytes
    held now; ``grows``: how many times the buffer had to grow."""

    def __init__(self):
        self._storage = torch.empty(0, dtype=torch.uint8)
        self._io = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._planned = {}          # layer dimensions -> (the storage they were planned in, their views)
        self.grows = 0

    @property
    def nbytes(self):
        return self._storage.numel() + sum(t.numel() for t in self._io)

    def _grow(self, buf, nbytes):
        if buf.numel() >= nbytes:
            return buf
        self.grows += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def _views(self, *dims):
        hit = self._planned.get(dims)
        if hit is not None and hit[0] is self._storage:
            return hit[1]
        if len(self._planned) >= 64:            # a server's batches come in many shapes: forget the old ones
            self._planned.clear()
        specs = _specs(*dims)
        offsets, total = plan([(n, dt.itemsize * _numel(s), st)
                               for n, dt, s, st in specs])
        self._storage = self._grow(self._storage, total)
        views = _Views(self._storage, specs, offsets)
        self._planned[dims] = (self._storage, views)
        return views

    def _outputs(self, x8, shape):
        """The (int8, int16) pair of ``shape`` a layer writes: the io buffer its input is not in."""
        n = _numel(shape)
        pick = 1 if self._io[0].numel() and _inside(x8, self._io[0]) else 0
        self._io[pick] = self._grow(self._io[pick], n * 3 + ALIGN)
        buf = self._io[pick]
        return buf[:n].view(torch.int8).view(shape), buf[-(-n // ALIGN) * ALIGN:][:2 * n].view(torch.int16).view(shape)

    def run_layer(self, p, x8, x16, mask, last=False):
        """``ref_layer(x8, x16, p, mask)`` with every activation in the arena; ``last``: return new
        tensors rather than arena views. Only for a layer :meth:`takes`."""
        kernels = ref._fused(x8)
        b, t, c = x8.shape
        heads, cq, ffn = p.heads, p.wq.shape[0], p.w1.shape[0]
        r, d = b * t, cq // heads
        k = layer_constants(p, t)
        # every GEMM of the layer on the int8 kernel (its depths c, cq, ffn; the probe's verdict)
        int8_gemms = all(ref._cpu_int8_kernel_takes(p.wo, depth) for depth in (c, cq, ffn))
        v = self._views(b, t, c, cq, heads, ffn, int8_gemms)
        n = v.np
        x8r = x8.reshape(r, c)

        rows = v.gemm_acc.numel() // max(3 * cq, c, ffn)    # the chunk _specs sized the GEMM scratch for

        def requant(constants, bits, out):
            return lambda acc, lo, hi: kernels.requant_rows(acc, constants, bits, out[lo:hi])
        self._gemm(v, x8r, k.qkv[0], rows, requant(k.qkv[1], 8, n.qkv))
        qkv = v.qkv.view(b, t, 3, heads, d)
        v.q_f32.copy_(qkv[:, :, 0].transpose(1, 2))
        v.k_f32.copy_(qkv[:, :, 1].transpose(1, 2))
        torch.matmul(v.q_f32, v.k_f32.transpose(-1, -2), out=v.scores_f32)     # K = d: exact in float32
        # the scores' requantization and the softmax in one pass, the probabilities over the scores
        scores = n.scores_f32.reshape(-1, t)
        keep, period = kernels.softmax_keep((b, heads, t, t), None if mask is None else mask[:, None, None, :],
                                            scores.shape[0])
        kernels.scores_softmax_rows(scores, k.scores, p.softmax, keep, period, ref.SOFTMAX_OUT_MAX,
                                    ref.SOFTMAX_FACTOR_BITS, scores)
        v.v_f32.copy_(qkv[:, :, 2].transpose(1, 2))
        torch.matmul(v.scores_f32, v.v_f32, out=v.ctx_f32)                    # K = T: exact in float32
        kernels.requant_rows(n.ctx_f32.reshape(-1, d), k.ctx, 8, n.ctx_heads.reshape(-1, d))
        v.ctx.view(b, t, heads, d).copy_(v.ctx_heads.transpose(1, 2))

        self._gemm(v, v.ctx, k.o[0], rows, requant(k.o[1], 16, n.attn))
        residual = np.ascontiguousarray(x16.reshape(r, c).numpy())
        kernels.layernorm_rows(n.attn, residual, k.ln1, *LN, n.h16[None], n.h8[None])
        # FFN1's requantization and GELU in one pass: its int16 output never reaches memory
        self._gemm(v, v.h8, k.f1[0], rows,
                   lambda acc, lo, hi: kernels.requant_gelu_rows(acc, k.f1[1], p.gelu, k.gelu, n.g[lo:hi]))
        self._gemm(v, v.g, k.f2[0], rows, requant(k.f2[1], 16, n.f2))
        if last:
            out8, out16 = torch.empty((r, c), dtype=torch.int8), torch.empty((r, c), dtype=torch.int16)
        else:
            out8, out16 = self._outputs(x8, (r, c))
        kernels.layernorm_rows(n.f2, n.h16, k.ln2, *LN, out16.numpy()[None], out8.numpy()[None])
        return out8.view(b, t, c), out16.view(b, t, c)

    @staticmethod
    def takes(x8, p):
        """Whether :meth:`run_layer` takes this layer: the fused CPU kernels present, float32 GEMMs at full
        precision, widths the contract's LayerNorm takes, and constants the fused kernels take."""
        return (ref._fused(x8) is not None and torch.get_float32_matmul_precision() == "highest"
                and x8.shape[-1] <= 1024 and x8.numel() > 0 and p.wq.shape[0] % p.heads == 0
                and layer_constants(p, x8.shape[1]) is not None)

    @staticmethod
    def _gemm(v, a, w, rows, epilogue):
        """Int8 ``a`` [R, K] times ``w``ᵀ in chunks of ``rows`` rows: ``epilogue(acc, lo, hi)`` gets
        each chunk's accumulator, rows ``lo:hi``, as a numpy array in the arena: int32 from the int8 kernel,
        or float32 holding the exact integers (summed in int32 past ``F32_EXACT_K``)."""
        r, k = a.shape
        n = w.shape[0]
        if ref._cpu_int8_kernel_takes(w, k):
            wt = w.T
            for lo in range(0, r, rows):
                hi = min(lo + rows, r)
                acc = v.gemm_acc[:(hi - lo) * n].view(hi - lo, n)
                torch._int_mm(a[lo:hi], wt, out=acc)
                epilogue(acc.numpy(), lo, hi)
            return
        w32 = v.gemm_w[:n * k].view(n, k)
        w32.copy_(w)
        for lo in range(0, r, rows):
            hi = min(lo + rows, r)
            a32 = v.gemm_a[:(hi - lo) * k].view(hi - lo, k)
            a32.copy_(a[lo:hi])
            prod = v.gemm_prod[:(hi - lo) * n].view(hi - lo, n)
            if k <= ref.F32_EXACT_K:
                torch.matmul(a32, w32.T, out=prod)          # every element an integer float32 holds exactly
                epilogue(prod.numpy(), lo, hi)
                continue
            acc = v.gemm_acc[:(hi - lo) * n].view(hi - lo, n)   # exact chunks, summed in int32 (ref._gemm_f32)
            for k0 in range(0, k, ref.F32_EXACT_K):
                torch.matmul(a32[:, k0:k0 + ref.F32_EXACT_K], w32[:, k0:k0 + ref.F32_EXACT_K].T, out=prod)
                if k0:
                    acc.add_(prod.to(torch.int32))
                else:
                    acc.copy_(prod)
            epilogue(acc.numpy(), lo, hi)


@dataclass(frozen=True)
class LayerConstants:
    """A layer's constants as the fused kernels take them, for one sequence length (the context's
    per-head requantization repeats every T rows): each GEMM's weights and requant constants (Q, K and
    V merged), the scores' and the context's requant constants, GELU's and both LayerNorms'."""
    qkv: tuple
    o: tuple
    f1: tuple
    f2: tuple
    scores: tuple
    ctx: tuple
    gelu: tuple
    ln1: tuple
    ln2: tuple


_CONSTANTS = {}         # id of a LayerParams -> (a weak reference to it, {sequence length: LayerConstants or None})


def layer_constants(p, t):
    """:class:`LayerConstants` of layer ``p`` at sequence length ``t``, prepared once (a layer's constants
    are not changed in place); None where the fused kernels do not take them (then :func:`ref_layer`
    runs the layer)."""
    hit = _CONSTANTS.get(id(p))
    if hit is None or hit[0]() is not p:
        hit = _CONSTANTS[id(p)] = (weakref.ref(p, lambda _, key=id(p), cache=_CONSTANTS: cache.pop(key, None)), {})
    if t not in hit[1]:
        if len(hit[1]) >= 64:
            hit[1].clear()
        hit[1][t] = _prepare(p, t)
    return hit[1][t]


def _prepare(p, t):
    kernels = ref._fused(p.wq)
    if kernels is None:
        return None
    heads, cq = p.heads, p.wq.shape[0]
    d = cq // heads

    def requant(m0, shift, bias, shape):
        m0, shift = ref._requant_constants(m0, shift, "cpu")
        return kernels.requant_constants(m0, shift, bias, shape)

    def gemm(w, bias, m0, shift):
        n = w.shape[0]
        if w.shape[1] >= 1 << 16 or (bias is not None and (bias.dtype != torch.int32 or bias.shape != (n,))):
            return None
        constants = requant(m0, shift, bias, (1, n))
        return None if constants is None else (w, constants)

    def one_group(constants):       # the fused epilogues take per-channel constants only
        return constants if constants is not None and constants[0].shape[0] == 1 else None

    c, ffn = p.wo.shape[0], p.w1.shape[0]

    def layernorm(outs):            # the arena writes an int8 and an int16 output
        return kernels.layernorm_constants(outs, c) if [o.bits for o in outs] == [8, 16] else None

    w, bias, m0, shift = fused_qkv(p)
    g_m0, g_shift = ref._requant_constants(p.g_m0, p.g_shift, "cpu")
    parts = dict(qkv=gemm(w, bias, m0, shift), o=gemm(p.wo, p.bo, p.o_m0, p.o_shift),
                 f1=gemm(p.w1, p.b1, p.f1_m0, p.f1_shift), f2=gemm(p.w2, p.b2, p.f2_m0, p.f2_shift),
                 scores=one_group(requant(p.score_m0, p.score_shift, None, (1, heads, t, t))),
                 ctx=requant(ref.per_head(p.ctx_m0, heads, d), ref.per_head(p.ctx_shift, heads, d), None,
                             (1, heads, t, d)),
                 gelu=kernels.gelu_constants(g_m0, g_shift, ffn),
                 ln1=layernorm([p.ln1_x8, p.ln1_x16]), ln2=layernorm([p.ln2_x8, p.ln2_x16]))
    if parts["f1"] is not None and one_group(parts["f1"][1]) is None:
        return None
    return None if any(x is None for x in parts.values()) else LayerConstants(**parts)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _inside(t, buf):
    start = buf.data_ptr()
    return start <= t.data_ptr() < start + buf.numel()


_LOCAL = threading.local()


def thread_arena():
    """This thread's arena (one per thread: a layer's buffers are not shared between concurrent calls)."""
    arena = getattr(_LOCAL, "arena", None)
    if arena is None:
        arena = _LOCAL.arena = ActivationArena()
    return arena
