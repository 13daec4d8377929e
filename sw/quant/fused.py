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

import math
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from ambert.proto.contract import OUT_RANGE

from .ref import remembered

__all__ = ["requant", "gelu_requant", "softmax", "layernorm", "requant_constants", "requant_rows",
           "gelu_constants", "gelu_rows", "layernorm_constants", "layernorm_rows", "requant_gelu_rows",
           "scores_softmax_rows", "softmax_keep"]

_DTYPE = {8: np.int8, 16: np.int16}          # the outputs the loops write, in the contract's OUT_RANGE
_TORCH = {np.int8: torch.int8, np.int16: torch.int16}


_THREADS = threading.local()        # the count last given to numba in this thread (numba's is per thread)


def _threads():
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_THREADS, "n", None) != n:
        numba.set_num_threads(n)
        _THREADS.n = n


@njit(parallel=True, cache=True)
def _requant(acc, bias, m0, shift, period, lo, hi, out, overflow):
    # acc: int32 [R, N]; bias: int64 [N]; m0, shift: int64 [G, N], row i taking group (i // period) % G.
    # ref.rshift_round's rounding term: (1 << s) >> 1 is 2**(s-1) for s > 0 and 0 for s = 0, with no
    # branch; and no store but the output's in the inner loop, so it vectorises.
    r, n = acc.shape
    groups = m0.shape[0]
    for i in prange(r):
        g = (i // period) % groups
        low, high = np.int64(0), np.int64(0)
        for j in range(n):
            x = np.int64(acc[i, j]) + bias[j]
            low, high = min(low, x), max(high, x)
            s = shift[g, j]
            out[i, j] = min(max((x * m0[g, j] + ((np.int64(1) << s) >> 1)) >> s, lo), hi)
        overflow[i] = low < -2147483648 or high > 2147483647


@njit(cache=True, inline="always")
def _gelu_int8(x, b_int, c_int, gshift, m0, sh):
    # ref_requant(ref_gelu(x), m0, sh, 8) of one int16 value x (as int64)
    base = min(abs(x), -b_int) + b_int
    poly = base * base + c_int
    minus_e = poly if x < 0 else -poly
    t = (minus_e - c_int) >> gshift
    g = np.int64(np.int32(t * x))                   # ref_gelu returns int32
    return min(max((g * m0 + ((np.int64(1) << sh) >> 1)) >> sh, -128), 127)


@njit(parallel=True, cache=True)
def _gelu_requant(q, b_int, c_int, gshift, m0, shift, out):
    # ref_gelu then ref_requant to int8; q: int16 [R, N]
    r, n = q.shape
    for i in prange(r):
        for j in range(n):
            out[i, j] = _gelu_int8(np.int64(q[i, j]), b_int, c_int, gshift, m0[j], shift[j])


@njit(parallel=True, cache=True)
def _requant_gelu(acc, bias, m0, shift, b_int, c_int, gshift, g_m0, g_shift, out, overflow):
    # the FFN's first GEMM's epilogue and its GELU in one pass: acc (+ bias) requantized to int16 as
    # _requant does (row i per-channel constants m0[j], shift[j]), then _gelu_requant's formula; the
    # int16 value never leaves the register
    r, n = acc.shape
    for i in prange(r):
        low, high = np.int64(0), np.int64(0)
        for j in range(n):
            x = np.int64(acc[i, j]) + bias[j]
            low, high = min(low, x), max(high, x)
            s = shift[j]
            f = min(max((x * m0[j] + ((np.int64(1) << s) >> 1)) >> s, -32768), 32767)
            out[i, j] = _gelu_int8(f, b_int, c_int, gshift, g_m0[j], g_shift[j])
        overflow[i] = low < -2147483648 or high > 2147483647


@njit(cache=True, inline="always")
def _exp(score, keep, top, m, b_int, c_int):
    # ref_softmax's integer exponential of score - top (0 for a masked key)
    d = (np.int64(score) if keep else np.int64(-32768)) - top
    z = (-d) >> m
    base = d + (z << m) + b_int
    poly = base * base + c_int
    x = (poly >> min(z, 30)) if z <= 30 else np.int64(0)
    return x if keep else np.int64(0)


@njit(cache=True, inline="always")
def _softmax_row(e, kp, top, m, b_int, c_int, out_max, factor_bits, out):
    # one row of ref_softmax: e holds its int16 scores (as int64; replaced by their exponentials), kp its
    # key mask, top their maximum over the kept keys; out the row to write
    total = np.int64(0)
    for j in range(e.shape[0]):
        x = _exp(e[j], kp[j], top, m, b_int, c_int)
        e[j] = x
        total += x
    factor = (np.int64(out_max) << factor_bits) // max(total, np.int64(1))
    half = np.int64(1) << (factor_bits - 1)
    for j in range(e.shape[0]):
        out[j] = (e[j] * factor + half) >> factor_bits


@njit(parallel=True, cache=True)
def _softmax(s, keep, period, m, b_int, c_int, out_max, factor_bits, out):
    # s: int16 [R, T]; keep: bool [G, T] (True = attend), row i taking keep[(i // period) % G]
    r, t = s.shape
    groups = keep.shape[0]
    for i in prange(r):
        kp = keep[(i // period) % groups]
        e = np.empty(t, np.int64)
        top = np.int64(-32768)
        for j in range(t):
            v = np.int64(s[i, j])
            e[j] = v
            top = max(top, v if kp[j] else np.int64(-32768))
        _softmax_row(e, kp, top, m, b_int, c_int, out_max, factor_bits, out[i])


@njit(parallel=True, cache=True)
def _scores_softmax(acc, m0, shift, keep, period, m, b_int, c_int, out_max, factor_bits, out):
    # ref_softmax(ref_requant(acc, m0, shift, 16)) row by row: acc [R, T] (int32, or float32 holding
    # integers: Q.K^T, no bias, |acc| < 2**31 by construction); m0, shift int64 [T]; keep as _softmax;
    # out [R, T] (int8, or float32 for the P.V product). Each row is read whole before it is written,
    # so ``out`` may be ``acc`` itself.
    r, t = acc.shape
    groups = keep.shape[0]
    for i in prange(r):
        kp = keep[(i // period) % groups]
        e = np.empty(t, np.int64)
        top = np.int64(-32768)
        for j in range(t):
            s = shift[j]
            q = min(max((np.int64(acc[i, j]) * m0[j] + ((np.int64(1) << s) >> 1)) >> s, -32768), 32767)
            e[j] = q
            top = max(top, q if kp[j] else np.int64(-32768))
        _softmax_row(e, kp, top, m, b_int, c_int, out_max, factor_bits, out[i])


@njit(cache=True, inline="always")
def _isqrt(n):
    x = np.int64(np.sqrt(np.float64(n)))
    while x * x > n:
        x -= 1
    while (x + 1) * (x + 1) <= n:
        x += 1
    return x


@njit(parallel=True, cache=True)
def _layernorm(a, b, gains, offsets, shifts, los, his, norm_bits, extra_bits, limit, out16, out8, slot, too_wide):
    # v = a + b (int32 sums of [R, C] arrays; ``b`` may be empty [0, 0]: v = a); gains/offsets: int64
    # [K, C]; output o goes to out16[slot[o]] (int16 [K16, R, C]) if slot[o] >= 0, else to
    # out8[-1 - slot[o]] (int8 [K8, R, C]), saturated to its range;
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
            q = slot[o]
            if q >= 0:
                for j in range(c):
                    out16[q, i, j] = min(max((v[j] * inv * gains[o, j] + offsets[o, j] + half) >> s, lo), hi)
            else:
                for j in range(c):
                    out8[-1 - q, i, j] = min(max((v[j] * inv * gains[o, j] + offsets[o, j] + half) >> s, lo), hi)


def layernorm_constants(outs, c):
    """(gains [K, C], offsets [K, C], shifts, lows, highs) of the LayerNorm outputs ``outs``, as int64,
    and each one's slot: its index among the int16 outputs, or -1 - its index among the int8 ones."""
    slot, wide, narrow = [], 0, 0
    for o in outs:
        if o.bits == 16:
            slot.append(wide)
            wide += 1
        else:
            slot.append(-1 - narrow)
            narrow += 1
    return (np.ascontiguousarray(torch.stack([o.gain.to(torch.int64).expand(c) for o in outs]).numpy()),
            np.ascontiguousarray(torch.stack([o.offset.to(torch.int64).expand(c) for o in outs]).numpy()),
            np.array([o.shift for o in outs], dtype=np.int64),
            np.array([OUT_RANGE[o.bits][0] for o in outs], dtype=np.int64),
            np.array([OUT_RANGE[o.bits][1] for o in outs], dtype=np.int64), np.array(slot, dtype=np.int64))


def _rows(t):
    return np.ascontiguousarray(t.detach().numpy()).reshape(-1, t.shape[-1])


def _per_channel(x, n):
    """``x`` (an int or an int tensor of 0 or 1 dims) as a new int64 array [n] (sharing no memory with
    ``x``: it is remembered while ``x`` lives, see :func:`ref.remembered`); None if it varies along other
    axes."""
    x = torch.as_tensor(x, dtype=torch.int64)
    if x.dim() > 1 and any(d != 1 for d in x.shape[:-1]):
        return None
    return np.array(x.reshape(-1).expand(n).numpy()) if x.numel() in (1, n) else None


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
        return np.array(x.expand(x.shape[0], 1, n).reshape(-1, n).numpy()), shape[-2]
    return None


def _into(out, shape, dtype):
    """``out`` (a contiguous tensor of ``dtype`` holding ``shape``'s elements) as a numpy array of
    ``shape`` the kernel writes into, or a new array when ``out`` is None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not out.is_contiguous() or out.numel() != math.prod(shape) or out.dtype != _TORCH[dtype]:
        raise ValueError(f"out must be a contiguous {np.dtype(dtype).name} tensor of {int(np.prod(shape))} "
                         f"elements, not {out.dtype} {tuple(out.shape)}")
    return out.numpy().reshape(shape)


def requant(acc, m0, shift, bits, bias=None, out=None):
    """:func:`ref.ref_requant` of ``acc`` (+ int32 ``bias`` [N], summed exactly; OverflowError if the sum
    leaves int32, as :func:`ref.ref_gemm` raises) with checked constants; None where the constants
    broadcast in a way :func:`_grouped` does not take. ``out``: a tensor to write the result into."""
    if bits not in _DTYPE:
        return None
    shape = tuple(acc.shape)
    key = (shape[-1], shape[-3:-1] if len(shape) >= 3 else None)
    prepared = remembered((m0, shift) if bias is None else (m0, shift, bias), key,
                          lambda: requant_constants(m0, shift, bias, shape))
    if prepared is None:
        return None
    rows = _rows(acc)
    res = _into(out, rows.shape, _DTYPE[bits])
    requant_rows(rows, prepared, bits, res)
    return torch.from_numpy(res).reshape(acc.shape) if out is None else out.view(acc.shape)


def requant_rows(rows, constants, bits, res):
    """:func:`requant` on prepared operands: ``rows`` a [R, N] int32 array (or float32 holding integers),
    ``constants`` from :func:`requant_constants` for its shape, ``res`` the [R, N] array of the output
    width (8 or 16 bits) to write."""
    m0_a, sh_a, period, bias_a = constants
    lo, hi = OUT_RANGE[bits]
    overflow = np.zeros(rows.shape[0], dtype=np.bool_)
    _threads()
    _requant(rows, bias_a, m0_a, sh_a, period, lo, hi, res, overflow)
    if overflow.any():
        raise OverflowError("GEMM accumulator overflows int32")


def requant_constants(m0, shift, bias, shape):
    """(m0 [G, N], shift [G, N], period, bias [N]) as :func:`_requant` takes them for an accumulator of
    ``shape`` (checked int64 ``m0``, ``shift``; int32 ``bias`` [N] or None), or None where the constants
    broadcast in a way :func:`_grouped` does not take."""
    n = shape[-1]
    m0_g, sh_g = _grouped(m0, shape), _grouped(shift, shape)
    if m0_g is None or sh_g is None:
        return None
    (m0_a, m0_period), (sh_a, sh_period) = m0_g, sh_g
    if m0_a.shape[0] > 1 and sh_a.shape[0] > 1 and (m0_a.shape[0], m0_period) != (sh_a.shape[0], sh_period):
        return None
    if m0_a.shape[0] != sh_a.shape[0]:
        groups = max(m0_a.shape[0], sh_a.shape[0])
        m0_a, sh_a = (np.ascontiguousarray(np.broadcast_to(a, (groups, n))) for a in (m0_a, sh_a))
    bias_a = np.zeros(n, np.int64) if bias is None else np.array(bias.numpy(), dtype=np.int64)
    return m0_a, sh_a, max(m0_period, sh_period), bias_a


def gelu_requant(q, gelu, m0, shift, out=None):
    """``ref_requant(ref_gelu(q, gelu), m0, shift, 8)`` in one pass (per-channel constants only)."""
    n = q.shape[-1]
    constants = remembered((m0, shift), n, lambda: gelu_constants(m0, shift, n))
    if constants is None:
        return None
    res = _into(out, (q.numel() // max(n, 1), n), np.int8)
    gelu_rows(_rows(q), gelu, *constants, res)
    return torch.from_numpy(res).reshape(q.shape) if out is None else out.view(q.shape)


def gelu_constants(m0, shift, n):
    """(m0 [N], shift [N]) as :func:`gelu_rows` takes them (checked int64 constants, per channel), or
    None where they vary along another axis."""
    m0_c, sh_c = _per_channel(m0, n), _per_channel(shift, n)
    return None if m0_c is None or sh_c is None else (m0_c, sh_c)


def gelu_rows(rows, gelu, m0, shift, res):
    """:func:`gelu_requant` on prepared operands: ``rows`` [R, N] int16, per-channel int64 ``m0`` and
    ``shift`` [N], ``res`` the [R, N] int8 array to write."""
    _threads()
    _gelu_requant(rows, gelu.b_int, gelu.c_int, gelu.shift, m0, shift, res)


def requant_gelu_rows(rows, constants, gelu, gelu_constants, res):
    """``gelu_requant(requant(rows, …, 16), …)`` in one pass: ``rows`` [R, N] int32 accumulators,
    ``constants`` from :func:`requant_constants` (one group: per-channel), ``gelu_constants`` from
    :func:`gelu_constants`, ``res`` the [R, N] int8 array to write."""
    m0_a, sh_a, _, bias_a = constants
    overflow = np.zeros(rows.shape[0], dtype=np.bool_)
    _threads()
    _requant_gelu(rows, bias_a, m0_a[0], sh_a[0], gelu.b_int, gelu.c_int, gelu.shift, *gelu_constants, res,
                  overflow)
    if overflow.any():
        raise OverflowError("GEMM accumulator overflows int32")


def scores_softmax_rows(rows, constants, p, keep, period, out_max, factor_bits, res):
    """``softmax(requant(rows, …, 16), …)`` in one pass: ``rows`` [R, T] attention scores (int32, or
    float32 holding integers; no bias), ``constants`` from :func:`requant_constants` (one group),
    ``keep``/``period`` the key mask as :func:`softmax_keep` gives it, ``res`` [R, T] (int8 or float32;
    it may be ``rows``)."""
    m0_a, sh_a, _, _ = constants
    _threads()
    _scores_softmax(rows, m0_a[0], sh_a[0], keep, period, p.m, p.b_int, p.c_int, out_max, factor_bits, res)


def softmax_keep(s_shape, mask, rows):
    """The key mask of a softmax over scores of ``s_shape`` (``rows`` of them) as the kernels read it:
    (keep: bool [G, T], period): row i attends to keep[(i // period) % G]. A key mask per batch entry
    ([B, 1, …, 1, T], as attention passes it) is read in place, not expanded."""
    t = s_shape[-1]
    if mask is None:
        return np.ones((1, t), dtype=np.bool_), rows or 1
    mask = mask.to(torch.bool)
    if (mask.dim() == len(s_shape) and mask.shape[-1] == t and mask.shape[0] == s_shape[0]
            and all(d == 1 for d in mask.shape[1:-1])):
        return np.ascontiguousarray(mask.reshape(mask.shape[0], t).numpy()), max(rows // s_shape[0], 1)
    return np.ascontiguousarray(mask.expand(s_shape).numpy()).reshape(-1, t), 1


def softmax(s, p, mask, out_max, factor_bits, out=None):
    """:func:`ref.ref_softmax`'s formula; ``mask`` None or bool broadcastable to ``s``. A key mask per
    batch entry ([B, 1, …, 1, T], as attention passes it) is read in place, not expanded."""
    rows = _rows(s)
    keep, period = softmax_keep(tuple(s.shape), mask, rows.shape[0])
    res = _into(out, rows.shape, np.int8)
    _threads()
    _softmax(rows, keep, max(period, 1), p.m, p.b_int, p.c_int, out_max, factor_bits, res)
    return torch.from_numpy(res).reshape(s.shape) if out is None else out.view(s.shape)


def layernorm(v, outs, norm_bits, extra_bits, limit, residual=None, out=None):
    """:func:`ref.ref_layernorm`'s formula of ``v`` (+ ``residual``, summed exactly) for every entry of
    ``outs``; OverflowError if any ``|v| >= limit``. ``out``: one tensor per entry of ``outs`` (of its
    width: int8 or int16) to write the results into."""
    c = v.shape[-1]
    key = (c, tuple((o.shift, o.bits) for o in outs))
    constants = remembered([t for o in outs for t in (o.gain, o.offset)], key,
                           lambda: layernorm_constants(outs, c))
    rows = _rows(v)
    other = np.zeros((0, 0), dtype=rows.dtype) if residual is None else _rows(residual)
    wide = [o.bits == 16 for o in outs]
    if out is None:
        out16 = np.empty((sum(wide), *rows.shape), dtype=np.int16)
        out8 = np.empty((len(outs) - sum(wide), *rows.shape), dtype=np.int8)
    else:
        # each output a [1, R, C] view of the tensor it goes to (a second output of one width: staged)
        if sum(wide) > 1 or len(outs) - sum(wide) > 1:
            res = layernorm(v, outs, norm_bits, extra_bits, limit, residual)
            for t, r in zip(out, res):
                t.view(r.shape).copy_(r)
            return [t.view(v.shape) for t in out]
        views = [_into(t, rows.shape, np.int16 if w else np.int8).reshape(1, *rows.shape) for t, w in zip(out, wide)]
        out16 = next((x for x, w in zip(views, wide) if w), np.empty((0, 0, 0), dtype=np.int16))
        out8 = next((x for x, w in zip(views, wide) if not w), np.empty((0, 0, 0), dtype=np.int8))
    layernorm_rows(rows, other, constants, norm_bits, extra_bits, limit, out16, out8)
    if out is not None:
        return [t.view(v.shape) for t in out]
    return [torch.from_numpy(out16[q] if q >= 0 else out8[-1 - q]).reshape(v.shape) for q in constants[-1]]


def layernorm_rows(rows, other, constants, norm_bits, extra_bits, limit, out16, out8):
    """:func:`layernorm` on prepared operands: ``rows`` and ``other`` [R, C] int arrays (``other`` [0, 0]:
    no residual), ``constants`` from :func:`layernorm_constants`, ``out16`` [K16, R, C] int16 and ``out8``
    [K8, R, C] int8 arrays the outputs go to (each by its slot)."""
    gains, offsets, shifts, los, his, slot = constants
    too_wide = np.zeros(rows.shape[0], dtype=np.bool_)
    _threads()
    _layernorm(rows, other, gains, offsets, shifts, los, his, norm_bits, extra_bits, limit, out16, out8, slot,
               too_wide)
    if too_wide.any():
        raise OverflowError("LayerNorm input exceeds the 18-bit residual range")
