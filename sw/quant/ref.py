"""The integer reference: every operation of the quantized BERT layer, bit-exact.

This module *is* the integer contract written down in ``docs/integer-contract.md``. Hardware blocks, the
simulated device, the GPU fallback and the CPU path are all compared with ``==`` against these functions.

Every function takes and returns integer tensors (``torch.int8``/``int16``/``int32``/``int64``) and works
on whichever device the tensors live on. Nothing here rounds in floating point:

* shifts are arithmetic (floor), so ``rshift_round(x, n) = (x + 2**(n-1)) >> n`` rounds ties toward +inf;
* divisions are floor divisions of non-negative integers;
* the only float arithmetic is in GEMMs of int8 values whose every partial sum is an integer the float type
  holds exactly (float32 over K-chunks of at most 1024, float64 otherwise; see :func:`ref_gemm`).

On the CPU, requantization, softmax, GELU and LayerNorm run as fused loops (:mod:`.fused`, numba) that
compute the torch formulas below element for element; ``FUSED = False`` keeps every CPU call on torch.
"""

import weakref
from dataclasses import dataclass

import torch

from ambert.proto.contract import (INT8_MAX, INT8_MIN, INT16_MAX, INT16_MIN, INT32_MAX, INT32_MIN, OUT_RANGE,
                                   REQUANT_M0_BITS, REQUANT_SHIFT_MAX)

__all__ = [
    "INT8_MIN", "INT8_MAX", "INT16_MIN", "INT16_MAX", "INT32_MIN", "INT32_MAX",
    "rshift_round", "saturate", "isqrt",
    "ref_gemm", "ref_requant", "ref_matmul",
    "GeluParams", "ref_gelu", "ref_gelu_requant",
    "SoftmaxParams", "ref_softmax",
    "LayerNormParams", "ref_layernorm", "ref_add_layernorm",
    "LayerParams", "ref_attention", "ref_heads", "ref_layer",
]

_OUT_DTYPE = {8: torch.int8, 16: torch.int16, 32: torch.int32}

FUSED = True            # CPU tensors take the fused loops of .fused where numba is installed
_FUSED_MODULE = None


def _fused(t):
    """The :mod:`.fused` module when ``t`` is a CPU tensor and the fused loops are on, else None."""
    global _FUSED_MODULE, FUSED
    if not FUSED or t.device.type != "cpu":
        return None
    if _FUSED_MODULE is None:
        try:
            from . import fused as module
        except ImportError:             # numba missing: the torch formulas serve
            FUSED = False
            return None
        _FUSED_MODULE = module
    return _FUSED_MODULE

# float64 holds every integer below 2**53 exactly; a dot product of int8 values has |sum| <= K * 2**14.
_F64_EXACT_K = 1 << (53 - 14)


def rshift_round(x, n):
    """Return ``(x + 2**(n-1)) >> n`` (round half toward +inf); ``x`` unchanged where ``n == 0``.

    ``x`` is int64; ``n`` is an int or an integer tensor broadcastable to ``x`` with
    0 <= n <= ``REQUANT_SHIFT_MAX`` (62).
    """
    if isinstance(n, int):
        if not 0 <= n <= REQUANT_SHIFT_MAX:
            raise ValueError(f"shift must be in [0, {REQUANT_SHIFT_MAX}], not {n}")
        return x if n == 0 else (x + (1 << (n - 1))) >> n
    n = n.to(torch.int64)
    half = torch.where(n > 0, torch.ones_like(n) << (n - 1).clamp(min=0), torch.zeros_like(n))
    return (x + half) >> n


def saturate(x, bits):
    """Clamp int64 ``x`` to the signed ``bits``-bit range and return it in the matching dtype."""
    lo, hi = OUT_RANGE[bits]
    return x.clamp(lo, hi).to(_OUT_DTYPE[bits])


def isqrt(n):
    """Return ``floor(sqrt(n))`` elementwise for an int64 tensor with 0 <= n < 2**62.

    Below 2**52 (LayerNorm's range) ``n`` is exact in float64 and its correctly rounded square root is
    within one of the answer, which one integer step each way then fixes. Above it: integer Newton
    iteration from above, ``x <- (x + n // x) // 2`` while it decreases, which ends on the unique integer
    square root; 40 steps take the start value 2**31 down to any result.
    """
    if bool((n < 0).any()):
        raise ValueError("isqrt of a negative number")
    if n.numel() == 0 or int(n.max()) < (1 << 52):
        x = torch.sqrt(n.to(torch.float64)).to(torch.int64)
        x = x - (x * x > n).to(torch.int64)
        return x + ((x + 1) * (x + 1) <= n).to(torch.int64)
    x = torch.full_like(n, 1 << 31)
    for _ in range(40):
        nxt = (x + n // x.clamp(min=1)) >> 1
        x = torch.where(nxt < x, nxt, x)
    return x


# --- GEMM and requantization -------------------------------------------------------------------------


def _check_int8(name, t):
    if t.dtype != torch.int8:
        raise TypeError(f"{name} must be torch.int8, not {t.dtype}")


def ref_gemm(a, b, bias=None):
    """Return ``bias + a @ b.T`` as int32: int8 ``a`` [..., M, K] times int8 ``b`` [N, K] or [..., N, K].

    ``bias`` is int32 [N] and initialises the accumulator, as the systolic array does. The sum is exact;
    it must fit int32 (the quantizer sizes biases so that it does at the model's K).

    On CUDA the product runs on the int8 tensor cores (``torch._int_mm``). On the CPU, shared weights (a
    2-D ``b``) with K a multiple of 8 go through ``torch._int_mm`` too when a one-time probe shows this
    CPU's int8 kernel exact (kernels without VNNI may saturate int16 pair sums) and faster than float32;
    everything else runs in float32 over K-chunks of at most :data:`F32_EXACT_K` (:func:`_gemm_f32`), whose
    every partial sum is an integer float32 holds exactly, the chunks summed in int32. All paths give the
    same bits.
    """
    _check_int8("a", a)
    _check_int8("b", b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"inner dimensions differ: a has K={a.shape[-1]}, b has K={b.shape[-1]}")
    k = a.shape[-1]
    if k >= _F64_EXACT_K:
        raise ValueError(f"K={k} is too large for an exact int32 accumulation")
    if bias is not None and bias.dtype != torch.int32:
        raise TypeError(f"bias must be torch.int32, not {bias.dtype}")
    # |sum| <= K * 2**14: when that plus the largest bias fits int32, no element can overflow and the
    # int32 kernels are exact; otherwise compute in int64 and check every element
    bound = (k << 14) + (0 if bias is None else int(bias.to(torch.int64).abs().max()) if bias.numel() else 0)
    if bound > INT32_MAX:
        acc = _gemm_f64(a, b) + (0 if bias is None else bias.to(torch.int64))
        if bool(((acc < INT32_MIN) | (acc > INT32_MAX)).any()):
            raise OverflowError("GEMM accumulator overflows int32")
        return acc.to(torch.int32)
    if a.is_cuda:
        acc = _gemm_cuda(a, b)
    elif _cpu_int8_kernel_takes(b, k):
        acc = torch._int_mm(a.reshape(-1, k), b.T).reshape(*a.shape[:-1], b.shape[0])
    elif torch.get_float32_matmul_precision() == "highest":
        acc = _gemm_f32(a, b)
    else:               # float32 products may run in a narrower type: no exactness argument holds
        acc = _gemm_f64(a, b).to(torch.int32)
    return acc if bias is None else acc + bias


def _gemm_f64(a, b):
    return torch.matmul(a.to(torch.float64), b.to(torch.float64).transpose(-1, -2)).to(torch.int64)


# float32 holds every integer of magnitude <= 2**24 exactly; one int8 product has |a * b| <= 2**14
F32_EXACT_K = 1 << (24 - 14)


def _gemm_f32(a, b):
    """``a @ b.T`` of int8 tensors as int32, in float32 over K-chunks of at most ``F32_EXACT_K`` (1024).

    Exact: every product is an integer with |a * b| <= 2**14, so every partial sum the float32 GEMM forms
    over a chunk — in whatever order and blocking, fused multiply-adds included — is an integer of
    magnitude <= 1024 * 2**14 = 2**24, which float32 represents exactly; no rounding ever happens, and
    the chunk's result converts to int32 exactly. The chunks' sum is the caller's, who has checked that
    the whole sum fits int32. (Needs float32 matmuls at full precision: ``ref_gemm`` checks
    ``torch.get_float32_matmul_precision()``.)
    """
    k = a.shape[-1]
    bt = b.transpose(-1, -2)
    acc = None
    for k0 in range(0, k, F32_EXACT_K):
        part = torch.matmul(a[..., k0:k0 + F32_EXACT_K].to(torch.float32),
                            bt[..., k0:k0 + F32_EXACT_K, :].to(torch.float32)).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


_INT_MM_OK = None


def _cpu_int8_kernel_takes(b, k):
    """Whether a CPU GEMM against ``b`` of depth ``k`` runs on ``torch._int_mm``: shared weights (2-D),
    K a multiple of 8 (the shapes the probe covers: oneDNN's AMX kernel answered K = 1 wrongly), and the
    probe has shown this CPU's kernel exact and faster than the float32 path."""
    return b.dim() == 2 and k % 8 == 0 and _cpu_int_mm_ok()


def _cpu_int_mm_ok():
    """Whether torch._int_mm on this CPU is exact at the extremes and faster than :func:`_gemm_f32` on a
    projection of MiniLM's shape (probed once). Both give the same bits; a CPU without an int8 dot-product
    instruction may have an exact kernel that is tens of times slower (AMD Zen 3: 33 ms against 1 ms)."""
    global _INT_MM_OK
    if _INT_MM_OK is None:
        _INT_MM_OK = cpu_int_mm_exact() and _best_time(torch._int_mm, 128, 384) < _best_time(_gemm_f32, 128, 384)
    return _INT_MM_OK


def cpu_int_mm_exact():
    """Whether torch._int_mm on this CPU is exact at the extremes (False where this torch has no CPU kernel)."""
    try:
        ok = True
        for va, vb in ((127, 127), (-128, -128), (127, -128), (-128, 127)):
            a = torch.full((8, 64), va, dtype=torch.int8)
            b = torch.full((8, 64), vb, dtype=torch.int8)
            b[:, ::3] = -vb - 1 if vb < 0 else -vb        # mixed signs in adjacent pairs as well
            ok &= torch.equal(torch._int_mm(a, b.T).to(torch.int64), _gemm_f64(a, b))
        return bool(ok)
    except RuntimeError:
        return False


def _best_time(gemm, m, k, reps=3):
    """The best of ``reps`` timings of ``gemm(a, b.T-layout)`` on int8 operands of ``m x k`` and ``k x k``,
    after one untimed call."""
    import time
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, k), generator=g, dtype=torch.int8)
    args = (a, b.T) if gemm is torch._int_mm else (a, b)
    gemm(*args)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        gemm(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def _gemm_cuda(a, b):
    if b.dim() == 2:
        # Shared weights: one GEMM on the int8 tensor cores. torch._int_mm wants M > 16 and K, N multiples
        # of 8 (zero padding adds nothing to any dot product), and cuBLASLt's int8 kernels are only
        # dependable in the "TN" layout: A row-major, B handed over as the transpose of a row-major N x K.
        # (Row-major B failed with CUBLAS_STATUS_NOT_SUPPORTED for small K on an H200.)
        k, n = a.shape[-1], b.shape[0]
        a2 = a.reshape(-1, k)
        m = a2.shape[0]
        mp, kp, np_ = max(17, -(-m // 8) * 8), -(-k // 8) * 8, -(-n // 8) * 8
        ap = torch.nn.functional.pad(a2, (0, kp - k, 0, mp - m))
        bp = torch.nn.functional.pad(b, (0, kp - k, 0, np_ - n))
        return torch._int_mm(ap, bp.t())[:m, :n].reshape(*a.shape[:-1], n)
    # Per-head products of two activations (QK^T, PV): batched, which torch._int_mm is not; float64
    # on the GPU is exact for K < 2**39, the same argument as on the CPU.
    return _gemm_f64(a, b).to(torch.int32)


_REMEMBERED = {}


def remembered(tensors, extra, build):
    """``build()`` for values derived from ``tensors`` (a model's constants: the same tensors, or views
    of them, call after call) and the hashable ``extra``, remembered while every one of them lives
    unchanged (its version counter still the same): a model's constants are checked and prepared once,
    not at every call. A view is known by its base and its place in it. The entry holds the tensors
    weakly, so a value must not hold them (or their memory) either — except the value being one of the
    tensors itself; otherwise it would keep a model's mapped file alive after the model is gone.
    Anything not a tensor among ``tensors``: built every time."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return build()
    bases = [t if t._base is None else t._base for t in tensors]
    key = (tuple((id(b), t.storage_offset(), tuple(t.shape), t.stride()) for b, t in zip(bases, tensors)), extra)
    hit = _REMEMBERED.get(key)
    if hit is not None and all(r() is b and v == b._version for r, v, b in zip(hit[0], hit[1], bases)):
        value = hit[2]
        return tensors[value.index] if isinstance(value, _Itself) else value
    value = build()
    if len(_REMEMBERED) >= 1 << 14:
        _REMEMBERED.clear()
    gone = (lambda _, key=key, memo=_REMEMBERED: memo.pop(key, None))
    stored = next((_Itself(i) for i, t in enumerate(tensors) if value is t), value)
    _REMEMBERED[key] = ([weakref.ref(b, gone) for b in bases], [b._version for b in bases], stored)
    return value


@dataclass(frozen=True)
class _Itself:
    """A remembered value that is one of its own tensors (its index), held as that, not as the tensor."""
    index: int


_INTS = {}              # (int, lo, hi, device) -> its checked int64 tensor (read-only, as every constant)


def _checked(x, lo, hi, device, what):
    """``x`` (an int or an integer tensor) as int64 on ``device``, every element in [lo, hi]; remembered
    (a tensor's until it changes, an int's for good), so a model's constants are checked once."""
    def check():
        t = torch.as_tensor(x, dtype=torch.int64, device=device)
        if bool(((t < lo) | (t > hi)).any()):
            raise ValueError(what)
        return t
    if isinstance(x, int):
        key = (x, lo, hi, str(device))
        t = _INTS.get(key)
        if t is None:
            if len(_INTS) >= 1 << 12:
                _INTS.clear()
            t = _INTS[key] = check()
        return t
    return remembered((x,), (lo, hi, str(device)), check) if isinstance(x, torch.Tensor) else check()


def per_head(t, heads, d):
    """A per-channel constant [heads * d] as [heads, 1, d]: one row per head, broadcast over tokens."""
    return t.view(heads, 1, d) if isinstance(t, torch.Tensor) else t


def _requant_constants(m0, shift, device):
    """``m0`` and ``shift`` as int64 tensors, checked against the contract's ranges."""
    return (_checked(m0, 0, (1 << REQUANT_M0_BITS) - 1, device,
                     f"requant multiplier must be in [0, 2**{REQUANT_M0_BITS})"),
            _checked(shift, 0, REQUANT_SHIFT_MAX, device, f"requant shift must be in [0, {REQUANT_SHIFT_MAX}]"))


def ref_requant(acc, m0, shift, bits=8):
    """Requantize the int32 accumulator: ``saturate((acc * m0 + 2**(shift-1)) >> shift, bits)``.

    One rounding, half toward +inf. ``m0`` (0 <= m0 < 2**REQUANT_M0_BITS) and ``shift`` (0 to
    ``REQUANT_SHIFT_MAX``) are ints or int tensors
    broadcast along the last axis (per output channel). ``bits`` is 8 (GEMM inputs) or 16 (residual
    stream); 32 is the bypass that only rounds. The product needs 62 bits: int64 holds it.
    """
    if acc.dtype != torch.int32:
        raise TypeError(f"acc must be torch.int32, not {acc.dtype}")
    m0, shift = _requant_constants(m0, shift, acc.device)
    fused = _fused(acc)
    if fused is not None and acc.numel():
        out = fused.requant(acc, m0, shift, bits)         # None unless the constants broadcast to acc
        if out is not None:
            return out
    if torch.broadcast_shapes(acc.shape, m0.shape, shift.shape) != acc.shape:
        return saturate(rshift_round(acc.to(torch.int64) * m0, shift), bits)
    # in place on one int64 copy: the requant of a wide GEMM is memory-bound
    x = acc.to(torch.int64).mul_(m0)
    if shift.dim() == 0:
        s = int(shift)
        if s:
            x.add_(1 << (s - 1)).bitwise_right_shift_(s)
    else:
        x.add_(torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0))
        x.bitwise_right_shift_(shift)
    lo, hi = OUT_RANGE[bits]
    return x.clamp_(lo, hi).to(_OUT_DTYPE[bits])


def _gemm_exact(a, b):
    """``a @ b.T`` without a bias, exact: int32 as :func:`ref_gemm` gives it, or — on the CPU's float32
    path with K within one exact chunk — the float32 product itself, every element an integer float32
    holds exactly (see :func:`_gemm_f32`), for a consumer that converts as it reads."""
    k = a.shape[-1]
    if (a.is_cuda or k > F32_EXACT_K or _cpu_int8_kernel_takes(b, k)
            or torch.get_float32_matmul_precision() != "highest"):
        return ref_gemm(a, b)
    _check_int8("a", a)
    _check_int8("b", b)
    if b.shape[-1] != k:
        raise ValueError(f"inner dimensions differ: a has K={k}, b has K={b.shape[-1]}")
    return torch.matmul(a.to(torch.float32), b.transpose(-1, -2).to(torch.float32))


def ref_matmul(a, w, bias, m0, shift, bits):
    """What one MATMUL instruction computes: ``ref_requant(ref_gemm(a, w, bias), m0, shift, bits)``, or
    with ``bits=None`` the int32 accumulator itself (the hardware's bypass)."""
    fused = _fused(a)
    if (fused is not None and bits is not None and a.numel() and (bias is None or (
            bias.dtype == torch.int32 and bias.dim() == 1 and bias.shape[0] == w.shape[-2]))):
        # the bias added in the requantization's pass, in int64, every sum checked against int32 as
        # ref_gemm checks it: the same result, or the same OverflowError
        acc = _gemm_exact(a, w)
        m0, shift = _requant_constants(m0, shift, a.device)
        out = fused.requant(acc, m0, shift, bits, bias)     # None unless the constants broadcast to acc
        if out is not None:
            return out
    acc = ref_gemm(a, w, bias)
    return acc if bits is None else ref_requant(acc, m0, shift, bits)


# --- GELU ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeluParams:
    """Integer constants of i-GELU for an input scale S (see :func:`ref_gelu`)."""
    b_int: int      # floor(-1.769 / (S / sqrt 2)), negative
    c_int: int      # floor(1 / (-0.2888 * (S / sqrt 2)**2)), negative
    shift: int      # right shift that keeps the polynomial term below 2**16


def ref_gelu(q, p):
    """Integer GELU of int16 ``q`` (scale S) -> int32 at scale ``S * 0.2888 * (S/sqrt 2)**2 * 2**shift / 2``.

    I-BERT's second-order erf: ``erf(x/sqrt 2) ~ sgn(x) * a * S'**2 * ((min(|q|, -b) + b)**2 + c)`` with
    ``a = -0.2888``, so ``GELU = x/2 * (1 + erf) ~ q * (-E - c) * S * |a| * S'**2 / 2`` with
    ``E = sgn(q) * ((min(|q|, -b) + b)**2 + c)``. ``t = -E - c`` lies in [0, -2c]; it is floored by ``shift`` so the product with
    an int16 ``q`` fits int32. At scale S the real GELU is ``q * t * S * 0.2888 * S'**2 * 2**shift / 2``.
    """
    if q.dtype != torch.int16:
        raise TypeError(f"GELU input must be torch.int16, not {q.dtype}")
    # int32 suffices (and is twice as fast) when every intermediate provably fits it
    fits32 = p.b_int ** 2 + 2 * abs(p.c_int) < 1 << 31 and (1 << 15) * ((2 * abs(p.c_int)) >> p.shift) < 1 << 31
    q = q.to(torch.int32 if fits32 else torch.int64)
    base = q.abs().clamp_(max=-p.b_int).add_(p.b_int)
    poly = base.mul_(base).add_(p.c_int)                    # (min(|q|, -b) + b)**2 + c: negative
    minus_e = torch.where(q < 0, poly, -poly)               # -E, where E = sgn(q) * poly
    t = minus_e.sub_(p.c_int).bitwise_right_shift_(p.shift)     # -E - c, in [0, -2c]
    return t.mul_(q).to(torch.int32)


def ref_gelu_requant(q, p, m0, shift):
    """``ref_requant(ref_gelu(q, p), m0, shift, 8)``: the FFN's GELU and its requantization to the int8
    input of FFN2 (one pass on the CPU)."""
    fused = _fused(q)
    if fused is not None and q.numel() and q.dtype == torch.int16:
        m0, shift = _requant_constants(m0, shift, q.device)
        out = fused.gelu_requant(q, p, m0, shift)
        if out is not None:
            return out
    return ref_requant(ref_gelu(q, p), m0, shift)


# --- softmax ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxParams:
    """Integer constants of i-softmax for an input scale S = ln 2 / 2**m."""
    m: int          # input fraction bits: one step of the input is ln2 / 2**m
    b_int: int      # floor(1.353 * 2**m / ln 2)
    c_int: int      # floor(0.344 / 0.3585 * (2**m / ln 2)**2)


SOFTMAX_OUT_MAX = 127           # output scale is 1/127: probabilities land on the whole int8 positive range
SOFTMAX_FACTOR_BITS = 32        # factor = floor(127 * 2**32 / sum): >= 11 bits of precision at seq 512


def ref_softmax(s, p, mask=None):
    """Integer softmax over the last axis: int16 scores at scale ln2/2**m -> int8 in [0, 127], scale 1/127.

    ``mask`` (bool, broadcastable, True = attend) removes keys; a row with no key left is all zeros.

    * ``d = s - max(s) <= 0``; ``z = (-d) >> m``; ``r = d + z * 2**m`` in (-2**m, 0], so ``e**(d*S) =
      2**-z * e**(r*S)``.
    * ``e**(r*S) ~ 0.3585 * S**2 * ((r + b)**2 + c)`` (I-BERT's polynomial); ``e = poly >> z`` (0 once
      z > 30).
    * ``out = (e * floor(127 * 2**32 / sum e) + 2**31) >> 32``, which never exceeds 127.
    """
    if s.dtype != torch.int16:
        raise TypeError(f"softmax input must be torch.int16, not {s.dtype}")
    # up to the exponentials int32 suffices (and is twice as fast) when the polynomial provably fits it
    fused = _fused(s)
    if fused is not None and s.numel():
        return fused.softmax(s, p, mask, SOFTMAX_OUT_MAX, SOFTMAX_FACTOR_BITS)
    fits32 = (abs(p.b_int) + (1 << p.m)) ** 2 + abs(p.c_int) < 1 << 31
    s = s.to(torch.int32 if fits32 else torch.int64)
    if mask is not None:
        mask = mask.to(torch.bool).expand(s.shape)
        s = torch.where(mask, s, INT16_MIN)
    d = s - s.amax(dim=-1, keepdim=True)
    z = d.neg().bitwise_right_shift_(p.m)
    r = d.add_(z << p.m)                                    # d + z * 2**m
    base = r.add_(p.b_int)
    poly = base.mul_(base).add_(p.c_int)
    e = torch.where(z <= 30, poly.bitwise_right_shift_(z.clamp_(max=30)), 0)
    if mask is not None:
        e = torch.where(mask, e, 0)
    e = e.to(torch.int64)
    total = e.sum(dim=-1, keepdim=True)
    factor = (SOFTMAX_OUT_MAX << SOFTMAX_FACTOR_BITS) // total.clamp(min=1)
    out = e.mul_(factor).add_(1 << (SOFTMAX_FACTOR_BITS - 1)).bitwise_right_shift_(SOFTMAX_FACTOR_BITS)
    return out.to(torch.int8)


# --- LayerNorm ----------------------------------------------------------------------------------------


LN_NORM_BITS = 30               # the normalised value y / std is carried at scale 2**-30
LN_STD_EXTRA_BITS = 8           # std is taken of 2**16 * var, i.e. with 8 more bits than isqrt(var)


@dataclass(frozen=True)
class LayerNormParams:
    """One LayerNorm output: per-channel ``gain`` (gamma over the output scale, fixed point with
    ``shift`` fraction bits), ``offset`` (beta, at the same fixed-point scale), and the output width."""
    gain: torch.Tensor      # int64 [C]
    offset: torch.Tensor    # int64 [C]
    shift: int
    bits: int


def ref_layernorm(v, outs):
    """Integer LayerNorm over the last axis of int32 ``v``; returns one tensor per entry of ``outs``.

    * ``mean = floor((2 * sum v + C) / (2C))`` (the rounded mean); ``y = v - mean``.
    * ``std = isqrt(floor(sum(y**2) * 2**16 / C))``, i.e. sqrt(var) * 2**8, exact; at least 1.
    * ``n = y * floor(2**(30+8) / std)``: y / std at scale 2**-30.
    * each output: ``saturate((n * gain + offset + 2**(shift-1)) >> shift, bits)``. gamma (per channel)
      and the output scale live in ``gain``, beta in ``offset``. Every intermediate fits int64 for
      |v| < 2**17 and C <= 1024; the quantizer picks ``shift`` so that ``|n * gain + offset| < 2**61``.

    LayerNorm's eps (1e-12 in BERT) is below one step of any input scale and is dropped.
    """
    if v.dtype != torch.int32:
        raise TypeError(f"LayerNorm input must be torch.int32, not {v.dtype}")
    c = v.shape[-1]
    if c > 1024:
        raise ValueError(f"LayerNorm width {c} exceeds the 1024 channels the contract is sized for")
    fused = _fused(v)
    if fused is not None and v.numel():
        return fused.layernorm(v, outs, LN_NORM_BITS, LN_STD_EXTRA_BITS, 1 << 17)
    v = v.to(torch.int64)
    if bool((v.abs() >= (1 << 17)).any()):
        raise OverflowError("LayerNorm input exceeds the 18-bit residual range")
    mean = (2 * v.sum(dim=-1, keepdim=True) + c) // (2 * c)
    y = v - mean
    var = ((y * y).sum(dim=-1, keepdim=True) << (2 * LN_STD_EXTRA_BITS)) // c
    std = isqrt(var).clamp(min=1)
    inv = (1 << (LN_NORM_BITS + LN_STD_EXTRA_BITS)) // std
    n = y * inv
    return [saturate(rshift_round(n * o.gain.to(v.device) + o.offset.to(v.device), o.shift), o.bits)
            for o in outs]


def ref_add_layernorm(a, b, outs):
    """``ref_layernorm(a + b, outs)`` of two int16 (or int32) tensors, their sum exact in int32: a residual
    add and the LayerNorm after it (one pass on the CPU)."""
    fused = _fused(a)
    if fused is not None and a.numel() and a.shape == b.shape and a.shape[-1] <= 1024 \
            and a.dtype in (torch.int16, torch.int32) and b.dtype in (torch.int16, torch.int32):
        return fused.layernorm(a, outs, LN_NORM_BITS, LN_STD_EXTRA_BITS, 1 << 17, residual=b)
    return ref_layernorm(a.to(torch.int32) + b.to(torch.int32), outs)


# --- one encoder layer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """All integer constants of one BERT encoder layer (see docs/integer-contract.md for the dataflow).

    Weights are int8 [out, in]; biases int32 [out]; ``*_m0``/``*_shift`` are requant constants, int64
    tensors [out] for per-channel ones and ints for per-tensor ones.
    """
    heads: int
    wq: torch.Tensor
    bq: torch.Tensor
    q_m0: torch.Tensor
    q_shift: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    k_m0: torch.Tensor
    k_shift: torch.Tensor
    wv: torch.Tensor
    bv: torch.Tensor
    v_m0: torch.Tensor
    v_shift: torch.Tensor
    score_m0: int               # Q.K^T (with 1/sqrt(d_head)) -> int16 softmax input
    score_shift: int
    softmax: SoftmaxParams
    ctx_m0: torch.Tensor        # P.V (heads merged) -> int8 context, per channel
    ctx_shift: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    o_m0: torch.Tensor          # attention output -> int16 at the first residual scale
    o_shift: torch.Tensor
    ln1_x8: LayerNormParams     # -> FFN1 input
    ln1_x16: LayerNormParams    # -> second residual
    w1: torch.Tensor
    b1: torch.Tensor
    f1_m0: torch.Tensor         # FFN1 -> int16 GELU input
    f1_shift: torch.Tensor
    gelu: GeluParams
    g_m0: torch.Tensor          # GELU output -> int8 FFN2 input, per channel
    g_shift: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    f2_m0: torch.Tensor         # FFN2 -> int16 at the second residual scale
    f2_shift: torch.Tensor
    ln2_x8: LayerNormParams     # -> next layer's GEMM input
    ln2_x16: LayerNormParams    # -> next layer's residual (or the model output)


def _split_heads(x, heads):
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def ref_attention(x8, p, mask=None, trace=None, matmul=ref_matmul):
    """Self-attention of int8 ``x8`` [B, T, C] up to the int8 context [B, T, C] (before the output GEMM).

    ``mask`` is bool [B, T], True for real tokens. ``trace``, a dict, receives the intermediate tensors.
    ``matmul`` runs every GEMM-plus-requant step (default :func:`ref_matmul`); a backend passes its own,
    which must return the same bits.
    """
    q = matmul(x8, p.wq, p.bq, p.q_m0, p.q_shift, 8)
    k = matmul(x8, p.wk, p.bk, p.k_m0, p.k_shift, 8)
    v = matmul(x8, p.wv, p.bv, p.v_m0, p.v_shift, 8)
    return ref_heads(q, k, v, p, mask, trace, matmul)


def ref_heads(q, k, v, p, mask=None, trace=None, matmul=ref_matmul):
    """The attention heads: int8 ``q``, ``k``, ``v`` [B, T, C] -> the int8 context [B, T, C] (scores,
    softmax, probabilities times values). Arguments as in :func:`ref_attention`."""
    qh, kh, vh = (_split_heads(t, p.heads) for t in (q, k, v))
    scores = matmul(qh, kh, None, p.score_m0, p.score_shift, 16)
    probs = ref_softmax(scores, p.softmax, None if mask is None else mask[:, None, None, :])
    b, h, t, d = vh.shape
    # the context's per-channel constants, per head: channel h*d + j of the merged context
    ctx = matmul(probs, vh.transpose(-1, -2).contiguous(), None, per_head(p.ctx_m0, h, d),
                 per_head(p.ctx_shift, h, d), 8)
    ctx = ctx.transpose(1, 2).reshape(b, t, h * d)
    if trace is not None:
        trace.update(q=q, k=k, v=v, score=scores, probs=probs, ctx=ctx)
    return ctx


def ref_layer(x8, x16, p, mask=None, trace=None, matmul=ref_matmul):
    """Run one encoder layer on the integer stream; return the next ``(x8, x16)``.

    ``x8`` int8 [B, T, C] feeds the GEMMs; ``x16`` int16 [B, T, C] is the same hidden state at the
    residual scale of this layer's first add. ``mask`` is bool [B, T], True for real tokens. ``trace``,
    a dict, receives every intermediate tensor (for fidelity reports and debugging hardware). ``matmul``
    is as in :func:`ref_attention`.
    """
    ctx = ref_attention(x8, p, mask, trace, matmul)
    attn = matmul(ctx, p.wo, p.bo, p.o_m0, p.o_shift, 16)
    h8, h16 = ref_add_layernorm(attn, x16, [p.ln1_x8, p.ln1_x16])       # LayerNorm(attn + x16)
    f1 = matmul(h8, p.w1, p.b1, p.f1_m0, p.f1_shift, 16)
    g = ref_gelu_requant(f1, p.gelu, p.g_m0, p.g_shift)
    f2 = matmul(g, p.w2, p.b2, p.f2_m0, p.f2_shift, 16)
    out8, out16 = ref_add_layernorm(f2, h16, [p.ln2_x8, p.ln2_x16])     # LayerNorm(f2 + h16)
    if trace is not None:
        trace.update(attn=attn, sum1=attn.to(torch.int32) + x16.to(torch.int32), h=h16, h8=h8, f1=f1, g=g,
                     f2=f2, sum2=f2.to(torch.int32) + h16.to(torch.int32), out=out16)
    return out8, out16
