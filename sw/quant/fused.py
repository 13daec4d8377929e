"""The integer contract's elementwise chains as fused CPU loops (numba): one pass over memory, every core.

Each kernel computes, element for element, the formula of its ``ref_*`` function in :mod:`.ref` — the
same integer operations in the same order, in int64 (or int32 where the reference proves int32 holds
every intermediate), with Python's floor division and an arithmetic right shift. No floating point
enters a result except ``isqrt``'s first guess, which integer steps then make exact. ``ref.py`` calls
these for CPU tensors when numba is installed; ``tests/test_fused.py`` holds each to the torch formula,
``==``, at the extremes and on MiniLM's own activations.

The first call of each kernel compiles it (a few seconds); the machine code is cached on disk beside
this file (numba's ``cache=True``), so later processes load it at once. Threads: numba's, set to torch's
intra-op count, so ``torch.set_num_threads`` governs both.
"""

import numba
import numpy as np
import torch
from numba import njit, prange

from ambert.proto.contract import OUT_RANGE

__all__ = ["requant", "gelu_requant", "softmax", "layernorm"]

_DTYPE = {8: np.int8, 16: np.int16}          # the outputs the loops write, in the contract's OUT_RANGE


def _threads():
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@njit(cache=True, inline="always")
def _rshift_round(x, s):
    return (x + (np.int64(1) << (s - 1))) >> s if s > 0 else x


@njit(cache=True, inline="always")
def _clamp(x, lo, hi):
    return lo if x < lo else hi if x > hi else x


@njit(parallel=True, cache=True)
def _requant(acc, bias, m0, shift, period, lo, hi, out, overflow):
    # acc: int32 [R, N]; bias: int64 [N]; m0, shift: int64 [G, N], row i taking group (i // period) % G
    r, n = acc.shape
    groups = m0.shape[0]
    for i in prange(r):
        g = (i // period) % groups
        for j in range(n):
            x = np.int64(acc[i, j]) + bias[j]
            if x < -2147483648 or x > 2147483647:
                overflow[i] = True
            out[i, j] = _clamp(_rshift_round(x * m0[g, j], shift[g, j]), lo, hi)


@njit(parallel=True, cache=True)
def _gelu_requant(q, b_int, c_int, gshift, m0, shift, lo, hi, out):
    # ref_gelu then ref_requant; q: int16 [R, N]
    r, n = q.shape
    for i in prange(r):
        for j in range(n):
            x = np.int64(q[i, j])
            base = min(abs(x), -b_int) + b_int
            poly = base * base + c_int
            minus_e = poly if x < 0 else -poly
            t = (minus_e - c_int) >> gshift
            g = np.int64(np.int32(t * x))                   # ref_gelu returns int32
            out[i, j] = _clamp(_rshift_round(g * m0[j], shift[j]), lo, hi)


@njit(parallel=True, cache=True)
def _softmax(s, keep, period, m, b_int, c_int, out_max, factor_bits, out):
    # s: int16 [R, T]; keep: bool [G, T] (True = attend), row i taking keep[(i // period) % G]
    r, t = s.shape
    groups = keep.shape[0]
    for i in prange(r):
        kp = keep[(i // period) % groups]
        top = np.int64(-32768)
        for j in range(t):
            v = np.int64(s[i, j]) if kp[j] else np.int64(-32768)
            top = max(top, v)
        e = np.empty(t, np.int64)
        total = np.int64(0)
        for j in range(t):
            v = np.int64(s[i, j]) if kp[j] else np.int64(-32768)
            d = v - top
            z = (-d) >> m
            base = d + (z << m) + b_int
            poly = base * base + c_int
            x = (poly >> min(z, 30)) if z <= 30 else np.int64(0)
            if not kp[j]:
                x = 0
            e[j] = x
            total += x
        factor = (np.int64(out_max) << factor_bits) // max(total, np.int64(1))
        half = np.int64(1) << (factor_bits - 1)
        for j in range(t):
            out[i, j] = (e[j] * factor + half) >> factor_bits


@njit(cache=True, inline="always")
def _isqrt(n):
    x = np.int64(np.sqrt(np.float64(n)))
    while x * x > n:
        x -= 1
    while (x + 1) * (x + 1) <= n:
        x += 1
    return x


@njit(parallel=True, cache=True)
def _layernorm(a, b, gains, offsets, shifts, los, his, norm_bits, extra_bits, limit, out, too_wide):
    # v = a + b (int32 sums of [R, C] arrays; ``b`` may be empty [0, 0]: v = a); gains/offsets: int64
    # [K, C]; out: int16 [K, R, C] (each output saturated to its range, which int16 holds);
    # too_wide[i]: row i holds a value with |v| >= limit (nothing else of it is computed)
    r, c = a.shape
    k = gains.shape[0]
    add = b.shape[0] > 0
    for i in prange(r):
        v = np.empty(c, np.int64)
        total = np.int64(0)
        for j in range(c):
            x = np.int64(a[i, j]) + (np.int64(b[i, j]) if add else 0)
            if x >= limit or x <= -limit:
                too_wide[i] = True
            v[j] = x
            total += x
        if too_wide[i]:
            continue
        mean = (2 * total + c) // (2 * c)
        sq = np.int64(0)
        for j in range(c):
            y = v[j] - mean
            v[j] = y
            sq += y * y
        var = (sq << (2 * extra_bits)) // c
        std = max(_isqrt(var), np.int64(1))
        inv = (np.int64(1) << (norm_bits + extra_bits)) // std
        for o in range(k):
            s = shifts[o]
            half = (np.int64(1) << (s - 1)) if s > 0 else np.int64(0)
            lo, hi = los[o], his[o]
            for j in range(c):
                x = (v[j] * inv * gains[o, j] + offsets[o, j] + half) >> s
                out[o, i, j] = lo if x < lo else hi if x > hi else x


def _rows(t):
    return np.ascontiguousarray(t.detach().numpy()).reshape(-1, t.shape[-1])


def _per_channel(x, n):
    """``x`` (an int or an int tensor of 0 or 1 dims) as int64 [n]; None if it varies along other axes."""
    x = torch.as_tensor(x, dtype=torch.int64)
    if x.dim() > 1 and any(d != 1 for d in x.shape[:-1]):
        return None
    return np.ascontiguousarray(x.reshape(-1).expand(n).numpy()) if x.numel() in (1, n) else None


def _grouped(x, shape):
    """Requant constants for an output of ``shape`` as ([G, N] int64, period): row i of the output taken
    as [R, N] uses group (i // period) % G. Constants per channel (0 or 1 dims) are one group; per head
    and channel ([G, 1, N] over [..., G, T, N], the attention context's) are G groups of period T. None
    for any other broadcast (the torch formula takes those)."""
    x = torch.as_tensor(x, dtype=torch.int64)
    n = shape[-1]
    if x.dim() <= 1:
        flat = _per_channel(x, n)
        return None if flat is None else (flat.reshape(1, n), 1)
    if (x.dim() == 3 and len(shape) >= 3 and x.shape[0] == shape[-3] and x.shape[1] == 1
            and x.shape[2] in (1, n)):
        return np.ascontiguousarray(x.expand(x.shape[0], 1, n).reshape(-1, n).numpy()), shape[-2]
    return None


def _into(out, shape, dtype):
    """``out`` (a contiguous tensor of ``dtype`` holding ``shape``'s elements) as a numpy array of
    ``shape`` the kernel writes into, or a new array when ``out`` is None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not out.is_contiguous() or out.numel() != int(np.prod(shape)) or out.numpy().dtype != dtype:
        raise ValueError(f"out must be a contiguous {np.dtype(dtype).name} tensor of {int(np.prod(shape))} "
                         f"elements, not {out.dtype} {tuple(out.shape)}")
    return out.numpy().reshape(shape)


def requant(acc, m0, shift, bits, bias=None, out=None):
    """:func:`ref.ref_requant` of ``acc`` (+ int32 ``bias`` [N], summed exactly; OverflowError if the sum
    leaves int32, as :func:`ref.ref_gemm` raises) with checked constants; None where the constants
    broadcast in a way :func:`_grouped` does not take. ``out``: a tensor to write the result into."""
    n = acc.shape[-1]
    m0_g, sh_g = _grouped(m0, acc.shape), _grouped(shift, acc.shape)
    if m0_g is None or sh_g is None or bits not in _DTYPE:
        return None
    (m0_a, m0_period), (sh_a, sh_period) = m0_g, sh_g
    if m0_a.shape[0] > 1 and sh_a.shape[0] > 1 and (m0_a.shape[0], m0_period) != (sh_a.shape[0], sh_period):
        return None
    period = max(m0_period, sh_period)
    if m0_a.shape[0] != sh_a.shape[0]:
        groups = max(m0_a.shape[0], sh_a.shape[0])
        m0_a, sh_a = (np.ascontiguousarray(np.broadcast_to(a, (groups, n))) for a in (m0_a, sh_a))
    bias_a = np.zeros(n, np.int64) if bias is None else bias.to(torch.int64).numpy()
    (lo, hi), dtype = OUT_RANGE[bits], _DTYPE[bits]
    rows = _rows(acc)
    res = _into(out, rows.shape, dtype)
    overflow = np.zeros(rows.shape[0], dtype=np.bool_)
    _threads()
    _requant(rows, bias_a, m0_a, sh_a, period, lo, hi, res, overflow)
    if overflow.any():
        raise OverflowError("GEMM accumulator overflows int32")
    return torch.from_numpy(res).reshape(acc.shape) if out is None else out.view(acc.shape)


def gelu_requant(q, gelu, m0, shift, out=None):
    """``ref_requant(ref_gelu(q, gelu), m0, shift, 8)`` in one pass (per-channel constants only)."""
    n = q.shape[-1]
    m0_c, sh_c = _per_channel(m0, n), _per_channel(shift, n)
    if m0_c is None or sh_c is None:
        return None
    res = _into(out, (q.numel() // max(n, 1), n), np.int8)
    _threads()
    _gelu_requant(_rows(q), gelu.b_int, gelu.c_int, gelu.shift, m0_c, sh_c, -128, 127, res)
    return torch.from_numpy(res).reshape(q.shape) if out is None else out.view(q.shape)


def softmax(s, p, mask, out_max, factor_bits, out=None):
    """:func:`ref.ref_softmax`'s formula; ``mask`` None or bool broadcastable to ``s``. A key mask per
    batch entry ([B, 1, …, 1, T], as attention passes it) is read in place, not expanded."""
    t = s.shape[-1]
    rows = _rows(s)
    if mask is None:
        keep, period = np.ones((1, t), dtype=np.bool_), rows.shape[0] or 1
    else:
        mask = mask.to(torch.bool)
        if (mask.dim() == s.dim() and mask.shape[-1] == t and mask.shape[0] == s.shape[0]
                and all(d == 1 for d in mask.shape[1:-1])):
            keep, period = np.ascontiguousarray(mask.reshape(mask.shape[0], t).numpy()), rows.shape[0] // s.shape[0]
        else:
            keep, period = np.ascontiguousarray(mask.expand(s.shape).numpy()).reshape(-1, t), 1
    res = _into(out, rows.shape, np.int8)
    _threads()
    _softmax(rows, keep, max(period, 1), p.m, p.b_int, p.c_int, out_max, factor_bits, res)
    return torch.from_numpy(res).reshape(s.shape) if out is None else out.view(s.shape)


def layernorm(v, outs, norm_bits, extra_bits, limit, residual=None, out=None, stage=None):
    """:func:`ref.ref_layernorm`'s formula of ``v`` (+ ``residual``, summed exactly) for every entry of
    ``outs``; OverflowError if any ``|v| >= limit``. ``out``: one tensor per entry of ``outs`` (of its
    width: int8 or int16) to write the results into; ``stage``: an int16 tensor of ``len(outs)`` times
    ``v``'s elements the kernel writes into first."""
    c = v.shape[-1]
    gains = np.ascontiguousarray(torch.stack([o.gain.to(torch.int64).expand(c) for o in outs]).numpy())
    offsets = np.ascontiguousarray(torch.stack([o.offset.to(torch.int64).expand(c) for o in outs]).numpy())
    shifts = np.array([o.shift for o in outs], dtype=np.int64)
    los = np.array([OUT_RANGE[o.bits][0] for o in outs], dtype=np.int64)
    his = np.array([OUT_RANGE[o.bits][1] for o in outs], dtype=np.int64)
    rows = _rows(v)
    other = np.zeros((0, 0), dtype=rows.dtype) if residual is None else _rows(residual)
    staged = _into(stage, (len(outs), *rows.shape), np.int16)
    too_wide = np.zeros(rows.shape[0], dtype=np.bool_)
    _threads()
    _layernorm(rows, other, gains, offsets, shifts, los, his, norm_bits, extra_bits, limit, staged, too_wide)
    if too_wide.any():
        raise OverflowError("LayerNorm input exceeds the 18-bit residual range")
    if out is None:
        return [torch.from_numpy(staged[i] if o.bits == 16 else staged[i].astype(np.int8)).reshape(v.shape)
                for i, o in enumerate(outs)]
    for i, o in enumerate(outs):            # each output already saturated to its width: the casts are exact
        np.copyto(_into(out[i], rows.shape, np.int16 if o.bits == 16 else np.int8), staged[i], casting="unsafe")
    return [t.view(v.shape) for t in out]
