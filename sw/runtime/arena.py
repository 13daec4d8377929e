"""The host's activation arena: one encoder layer on the CPU without allocating its activations.

Every tensor a layer makes — the merged Q/K/V projection, the float32 copies the exact GEMM path reads,
scores, probabilities, the context, the residual sums and LayerNorm outputs, the FFN's activations, and
the GEMMs' float32 and int32 scratch — is a view into one buffer, placed by liveness: the layer's
dataflow is a fixed sequence of steps, each tensor lives over a set of them, and two tensors share
bytes only when their sets do not meet (:func:`plan`). Layers and calls reuse the buffer; it grows only
when a larger batch, sequence or layer arrives, so a server that has seen its largest batch allocates no
activation memory again. The layer outputs alternate between two further buffers (a layer's input is the
previous layer's output); the last layer's come back as new tensors, since the caller keeps them.

The arithmetic is the contract's, through the same kernels as :func:`ambert.sw.quant.ref.ref_layer`'s
fused CPU path (:mod:`ambert.sw.quant.fused`) and the same exact GEMM paths (``torch._int_mm`` where the
probe shows this CPU's kernel exact, else float32 over K-chunks of at most ``F32_EXACT_K``): the bits are
``ref_layer``'s. A GEMM outside the shapes planned here runs through ``ref_matmul`` and is copied in.
"""

import threading

import torch

from ambert.sw.compiler.layer import fused_qkv
from ambert.sw.quant import ref

__all__ = ["ALIGN", "plan", "ActivationArena"]

ALIGN = 64              # bytes: every tensor starts on a cache line

# the steps of one layer, in order; a tensor lives over the steps that write or read it
QKV, QKV_F32, SCORES, SCORES_Q, SOFTMAX, PV_F32, PV, CTX_Q, MERGE, PROJ_O, LN1, FFN1, GELU, FFN2, LN2 = range(15)
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


def _specs(b, t, c, cq, heads, ffn, int8_gemms):
    """The tensors of one layer: ``(name, dtype, shape, steps)``; the float32 GEMM scratch only where
    the GEMMs do not all run on the int8 kernel (``int8_gemms``)."""
    r, d = b * t, cq // heads
    k_max = max(c, cq, ffn)
    n_max = max(3 * cq, c, ffn)
    att = (b, heads, t, t)
    return [
        ("qkv", torch.int8, (r, 3 * cq), frozenset(range(QKV, PV_F32 + 1))),
        ("q_f32", torch.float32, (b, heads, t, d), frozenset({QKV_F32, SCORES})),
        ("k_f32", torch.float32, (b, heads, t, d), frozenset({QKV_F32, SCORES})),
        ("scores_f32", torch.float32, att, frozenset({SCORES, SCORES_Q})),
        ("scores", torch.int16, att, frozenset({SCORES_Q, SOFTMAX})),
        ("probs", torch.int8, att, frozenset({SOFTMAX, PV_F32})),
        ("probs_f32", torch.float32, att, frozenset({PV_F32, PV})),
        ("v_f32", torch.float32, (b, heads, t, d), frozenset({PV_F32, PV})),
        ("ctx_f32", torch.float32, (b, heads, t, d), frozenset({PV, CTX_Q})),
        ("ctx_heads", torch.int8, (b, heads, t, d), frozenset({CTX_Q, MERGE})),
        ("ctx", torch.int8, (r, cq), frozenset({MERGE, PROJ_O})),
        ("attn", torch.int16, (r, c), frozenset({PROJ_O, LN1})),
        ("h8", torch.int8, (r, c), frozenset({LN1, FFN1})),
        ("h16", torch.int16, (r, c), frozenset(range(LN1, LN2 + 1))),
        ("f1", torch.int16, (r, ffn), frozenset({FFN1, GELU})),
        ("g", torch.int8, (r, ffn), frozenset({GELU, FFN2})),
        ("f2", torch.int16, (r, c), frozenset({FFN2, LN2})),
        # the GEMMs' scratch, at the largest of the four
        ("gemm_acc", torch.int32, (r * n_max,), GEMM_STEPS),
    ] + ([] if int8_gemms else [
        ("gemm_a", torch.float32, (r * k_max,), GEMM_STEPS),
        ("gemm_w", torch.float32, (n_max * k_max,), GEMM_STEPS),
        ("gemm_prod", torch.float32, (r * n_max,), GEMM_STEPS),
    ])


class _Views:
    def __init__(self, storage, specs, offsets):
        for name, dtype, shape, _ in specs:
            start = offsets[name]
            setattr(self, name, storage[start:start + _numel(shape) * dtype.itemsize].view(dtype).view(shape))


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
        tensors rather than arena views."""
        kernels = ref._fused(x8)
        b, t, c = x8.shape
        heads, cq, ffn = p.heads, p.wq.shape[0], p.w1.shape[0]
        # every GEMM of the layer on the int8 kernel (its depths c, cq, ffn; the probe's verdict)
        int8_gemms = all(ref._cpu_int8_kernel_takes(p.wo, k) for k in (c, cq, ffn))
        v = self._views(b, t, c, cq, heads, ffn, int8_gemms)
        r, d = b * t, cq // heads
        x8r = x8.reshape(r, c)

        w, bias, m0, shift = fused_qkv(p)
        self._matmul(v, x8r, w, bias, m0, shift, 8, v.qkv)
        qkv = v.qkv.view(b, t, 3, heads, d)
        v.q_f32.copy_(qkv[:, :, 0].transpose(1, 2))
        v.k_f32.copy_(qkv[:, :, 1].transpose(1, 2))
        torch.matmul(v.q_f32, v.k_f32.transpose(-1, -2), out=v.scores_f32)     # K = d: exact in float32
        self._requant(v.scores_f32, None, p.score_m0, p.score_shift, 16, v.scores)
        kernels.softmax(v.scores, p.softmax, None if mask is None else mask[:, None, None, :], ref.SOFTMAX_OUT_MAX,
                        ref.SOFTMAX_FACTOR_BITS, out=v.probs)
        v.probs_f32.copy_(v.probs)
        v.v_f32.copy_(qkv[:, :, 2].transpose(1, 2))
        torch.matmul(v.probs_f32, v.v_f32, out=v.ctx_f32)                     # K = T: exact in float32
        self._requant(v.ctx_f32, None, ref.per_head(p.ctx_m0, heads, d), ref.per_head(p.ctx_shift, heads, d), 8,
                      v.ctx_heads)
        v.ctx.view(b, t, heads, d).copy_(v.ctx_heads.transpose(1, 2))

        self._matmul(v, v.ctx, p.wo, p.bo, p.o_m0, p.o_shift, 16, v.attn)
        kernels.layernorm(v.attn, [p.ln1_x8, p.ln1_x16], *LN, residual=x16.reshape(r, c), out=[v.h8, v.h16])
        self._matmul(v, v.h8, p.w1, p.b1, p.f1_m0, p.f1_shift, 16, v.f1)
        if kernels.gelu_requant(v.f1, p.gelu, *ref._requant_constants(p.g_m0, p.g_shift, "cpu"), out=v.g) is None:
            v.g.copy_(ref.ref_gelu_requant(v.f1, p.gelu, p.g_m0, p.g_shift))
        self._matmul(v, v.g, p.w2, p.b2, p.f2_m0, p.f2_shift, 16, v.f2)
        if last:
            out8, out16 = torch.empty((r, c), dtype=torch.int8), torch.empty((r, c), dtype=torch.int16)
        else:
            out8, out16 = self._outputs(x8, (r, c))
        kernels.layernorm(v.f2, [p.ln2_x8, p.ln2_x16], *LN, residual=v.h16, out=[out8, out16])
        return out8.view(b, t, c), out16.view(b, t, c)

    @staticmethod
    def takes(x8, p):
        """Whether :meth:`run_layer` takes this layer: the fused CPU kernels present, float32 GEMMs at full
        precision, and widths the contract's LayerNorm takes."""
        return (ref._fused(x8) is not None and torch.get_float32_matmul_precision() == "highest"
                and x8.shape[-1] <= 1024 and x8.numel() > 0 and p.wq.shape[0] % p.heads == 0)

    @staticmethod
    def _requant(acc, bias, m0, shift, bits, out):
        m0, shift = ref._requant_constants(m0, shift, "cpu")
        if ref._fused(out).requant(acc, m0, shift, bits, bias, out=out) is None:
            raise ValueError("the arena's requantization constants broadcast in a way the fused kernel does not take")

    def _matmul(self, v, a, w, bias, m0, shift, bits, out):
        """``ref_matmul(a, w, bias, m0, shift, bits)`` of int8 ``a`` [R, K] into ``out`` [R, N]."""
        r, k = a.shape
        n = w.shape[0]
        if k >= 1 << 16 or (bias is not None and (bias.dtype != torch.int32 or bias.shape != (n,))):
            out.copy_(ref.ref_matmul(a, w, bias, m0, shift, bits))
            return
        if ref._cpu_int8_kernel_takes(w, k):
            acc = v.gemm_acc[:r * n].view(r, n)
            torch._int_mm(a, w.T, out=acc)
        else:
            a32 = v.gemm_a[:r * k].view(r, k)
            w32 = v.gemm_w[:n * k].view(n, k)
            a32.copy_(a)
            w32.copy_(w)
            prod = v.gemm_prod[:r * n].view(r, n)
            if k <= ref.F32_EXACT_K:
                torch.matmul(a32, w32.T, out=prod)          # every element an integer float32 holds exactly
                acc = prod
            else:                                           # exact chunks, summed in int32 (see ref._gemm_f32)
                acc = v.gemm_acc[:r * n].view(r, n)
                for k0 in range(0, k, ref.F32_EXACT_K):
                    torch.matmul(a32[:, k0:k0 + ref.F32_EXACT_K], w32[:, k0:k0 + ref.F32_EXACT_K].T, out=prod)
                    if k0:
                        acc.add_(prod.to(torch.int32))
                    else:
                        acc.copy_(prod)
        m0c, shiftc = ref._requant_constants(m0, shift, "cpu")
        if ref._fused(acc).requant(acc, m0c, shiftc, bits, bias, out=out) is None:
            out.copy_(ref.ref_matmul(a, w, bias, m0, shift, bits))


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
