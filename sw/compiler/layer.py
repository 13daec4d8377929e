"""One encoder layer as a device runs it: the contract's ``ref_layer`` dataflow, reordered for a device.

Two changes, neither of which changes a bit:

* Q, K and V are one GEMM: their weights, biases and (per-channel) requant constants are concatenated,
  so the activations cross the link once and the array sees one wide GEMM.
* Before each projection the device is told the weights of the next one (``expect``), so it can load
  them while this one computes (the sim device keeps them resident in its pool).

Softmax, GELU and LayerNorm stay on the host, exactly as in :func:`sw.quant.ref.ref_layer`.
"""

import weakref

import torch

from ambert.sw.quant.ref import ref_add_layernorm, ref_gelu_requant, ref_heads

__all__ = ["fused_qkv", "run_layer"]

_FUSED = {}


def _per_channel(v, n):
    return torch.as_tensor(v, dtype=torch.int64).expand(n)


def fused_qkv(p):
    """``(w, bias, m0, shift)`` of the merged Q/K/V projection of :class:`LayerParams` ``p`` (cached)."""
    hit = _FUSED.get(id(p))
    if hit is not None and hit[0]() is p:
        return hit[1]
    parts = ((p.wq, p.bq, p.q_m0, p.q_shift), (p.wk, p.bk, p.k_m0, p.k_shift), (p.wv, p.bv, p.v_m0, p.v_shift))
    w = torch.cat([x[0] for x in parts])
    bias = torch.cat([x[1] for x in parts])
    m0 = torch.cat([_per_channel(x[2], x[0].shape[0]) for x in parts])
    shift = torch.cat([_per_channel(x[3], x[0].shape[0]) for x in parts])
    fused = (w, bias, m0, shift)
    _FUSED[id(p)] = (weakref.ref(p, lambda _, key=id(p), cache=_FUSED: cache.pop(key, None)), fused)
    return fused


def _projections(p):
    """The static GEMMs of a layer in the order they run: (w, bias, m0, shift, bits)."""
    return [(*fused_qkv(p), 8), (p.wo, p.bo, p.o_m0, p.o_shift, 16), (p.w1, p.b1, p.f1_m0, p.f1_shift, 16),
            (p.w2, p.b2, p.f2_m0, p.f2_shift, 16)]


def run_layer(p, x8, x16, mask, matmul, expect=None, next_p=None):
    """Run one encoder layer; returns ``(x8, x16)`` equal to ``ref_layer(x8, x16, p, mask)``.

    ``matmul`` runs each GEMM + requant (the device's, with its fallback); ``expect(w, bias, m0, shift,
    bits, rows)``, if given, is called before each projection with the next projection's weights —
    this layer's, then ``next_p``'s first.
    """
    qkv, proj_o, ffn1, ffn2 = _projections(p)
    upcoming = [proj_o, ffn1, ffn2, _projections(next_p)[0] if next_p is not None else None]
    rows = x8.shape[0] * x8.shape[1]

    def project(x, gemm, nxt):
        if expect is not None and nxt is not None:
            expect(*nxt, rows)
        return matmul(x, *gemm)

    qkv_out = project(x8, qkv, upcoming[0])
    c = p.wq.shape[0]
    q, k, v = (qkv_out[..., i * c:(i + 1) * c].contiguous() for i in range(3))
    ctx = ref_heads(q, k, v, p, mask, matmul=matmul)
    attn = project(ctx, proj_o, upcoming[1])
    h8, h16 = ref_add_layernorm(attn, x16, [p.ln1_x8, p.ln1_x16])
    f1 = project(h8, ffn1, upcoming[2])
    g = ref_gelu_requant(f1, p.gelu, p.g_m0, p.g_shift)
    f2 = project(g, ffn2, upcoming[3])
    return tuple(ref_add_layernorm(f2, h16, [p.ln2_x8, p.ln2_x16]))
