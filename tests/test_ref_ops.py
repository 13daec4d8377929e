"""The integer reference ops against their spec, transcribed a second time in plain Python integers."""

import math
import random

import pytest
import torch

from ambert.sw.quant.fixedpoint import gelu_params, layernorm_params, multiplier, softmax_params
from ambert.sw.quant.ref import (F32_EXACT_K, INT16_MAX, INT16_MIN, INT32_MAX, INT32_MIN, LN_NORM_BITS,
                                 LN_STD_EXTRA_BITS, SOFTMAX_FACTOR_BITS, SOFTMAX_OUT_MAX, SoftmaxParams, _gemm_f32,
                                 isqrt, ref_gelu, ref_gemm, ref_layernorm, ref_requant, ref_softmax, rshift_round)

ref_gemm_f32 = _gemm_f32


def py_rshift_round(x, n):
    return x if n == 0 else (x + (1 << (n - 1))) >> n


def py_sat(x, bits):
    return max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, x))


# --- rounding and requantization ------------------------------------------------------------------------

def test_rshift_round_ties_go_up():
    x = torch.tensor([1, 3, 5, -1, -3, -5, 2, -2, 0], dtype=torch.int64)
    assert rshift_round(x, 1).tolist() == [1, 2, 3, 0, -1, -2, 1, -1, 0]
    assert rshift_round(x, 0).tolist() == x.tolist()


def test_rshift_round_per_element_shift():
    x = torch.tensor([7, 7, 7, -7], dtype=torch.int64)
    n = torch.tensor([0, 1, 3, 2])
    assert rshift_round(x, n).tolist() == [py_rshift_round(7, 0), py_rshift_round(7, 1),
                                           py_rshift_round(7, 3), py_rshift_round(-7, 2)]


def test_requant_matches_spec_on_random_and_extreme_values():
    rng = random.Random(1)
    accs = [INT32_MIN, INT32_MAX, 0, 1, -1] + [rng.randint(INT32_MIN, INT32_MAX) for _ in range(2000)]
    m0s = [(1 << 31) - 1, 1 << 30, 1] + [rng.randint(1 << 30, (1 << 31) - 1) for _ in range(7)]
    shifts = [0, 1, 20, 31, 40, 62]
    acc = torch.tensor(accs, dtype=torch.int32)
    for m0 in m0s:
        for sh in shifts:
            for bits in (8, 16, 32):
                got = ref_requant(acc, m0, sh, bits).tolist()
                want = [py_sat(py_rshift_round(a * m0, sh), bits) for a in accs]
                assert got == want, (m0, sh, bits)


def test_requant_per_channel_constants():
    acc = torch.tensor([[1000, -1000, 37]], dtype=torch.int32)
    m0 = torch.tensor([1 << 30, 3 << 29, (1 << 31) - 1])
    sh = torch.tensor([31, 32, 35])
    want = [py_sat(py_rshift_round(a * int(m), int(s)), 8) for a, m, s in zip([1000, -1000, 37], m0, sh)]
    assert ref_requant(acc, m0, sh).tolist() == [want]


def test_requant_ties_round_toward_plus_infinity():
    # multiplier 0.5 exactly: every odd accumulator is a tie
    acc = torch.tensor([1, 3, -1, -3, 255, -255], dtype=torch.int32)
    assert ref_requant(acc, 1 << 30, 31).tolist() == [1, 2, 0, -1, 127, -127]


def test_requant_saturates():
    acc = torch.tensor([INT32_MAX, INT32_MIN, 40000, -40000], dtype=torch.int32)
    assert ref_requant(acc, 1 << 30, 30, 8).tolist() == [127, -128, 127, -128]
    assert ref_requant(acc, 1 << 30, 30, 16).tolist() == [32767, -32768, 32767, -32768]


@pytest.mark.parametrize("m0, shift, kind", [(-1, 3, ValueError), (1 << 31, 3, ValueError),
                                             (5, 63, ValueError), (5, -1, ValueError)])
def test_requant_refuses_bad_constants(m0, shift, kind):
    with pytest.raises(kind):
        ref_requant(torch.zeros(3, dtype=torch.int32), m0, shift)


def test_requant_refuses_wrong_dtype():
    with pytest.raises(TypeError, match="int32"):
        ref_requant(torch.zeros(3, dtype=torch.int64), 1, 1)


@pytest.mark.parametrize("real", [1.0, 0.5, 1 / 3, 1e-9, 1e-15, 123.456, 2.0 ** -40, 0.9999999999])
def test_multiplier_is_close_and_in_range(real):
    m0, shift = multiplier(real)
    assert 0 < m0 < 1 << 31 and 0 <= shift <= 62
    approx = m0 / 2 ** shift
    assert abs(approx - real) <= real * 2 ** -29 or shift == 62


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), 2.0 ** 40, 1e-30])
def test_multiplier_refuses_unrepresentable_ratios(bad):
    with pytest.raises(ValueError):
        multiplier(bad)


# --- GEMM -------------------------------------------------------------------------------------------------

def py_gemm(a, b, bias=None):
    out = a.to(torch.int64) @ b.to(torch.int64).T if a.dim() == 2 else None
    return out if bias is None else out + bias.to(torch.int64)


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 7), (17, 64, 9), (33, 384, 40), (8, 1536, 24),
                                     (5, 3072, 11)])
def test_gemm_matches_int64(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, generator=g)
    want = [[sum(int(x) * int(y) for x, y in zip(ra, rb)) + int(bias[j]) for j, rb in enumerate(b.tolist())]
            for ra in a.tolist()] if m * k * n < 200_000 else (py_gemm(a, b, bias)).tolist()
    assert ref_gemm(a, b, bias).tolist() == want


def test_gemm_extreme_products_at_k3072():
    k = 3072
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    assert ref_gemm(a, b).tolist() == [[k * 16384, -k * 16256]] * 2


def test_gemm_where_float32_is_inexact():
    # the exact sum is odd and above 2**24, so no float32 can hold it; ref_gemm must still be exact
    k = 1536
    a = torch.full((1, k), 127, dtype=torch.int8)
    b = torch.full((1, k), 127, dtype=torch.int8)
    b[0, 0] = 126
    exact = 127 * 127 * k - 127
    assert int(torch.matmul(a.float(), b.float().T).item()) != exact
    assert ref_gemm(a, b).item() == exact


def test_gemm_batched_heads():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (2, 3, 5, 8), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (2, 3, 4, 8), dtype=torch.int8, generator=g)
    got = ref_gemm(a, b)
    for i in range(2):
        for h in range(3):
            assert got[i, h].tolist() == py_gemm(a[i, h], b[i, h]).tolist()


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 3072, 5), (40, 384, 1536)])
def test_gemm_cpu_paths_agree(m, k, n):
    from ambert.sw.quant.ref import _gemm_f64
    g = torch.Generator().manual_seed(m + k)
    for a, b in ((torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
                  torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)),
                 (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8))):
        assert torch.equal(ref_gemm(a, b).to(torch.int64), _gemm_f64(a, b))


def test_gemm_every_short_k_on_every_shape():
    """K from 1 to 40 against int64, each twice (a kernel that reads past its operands answers K = 1
    differently on each call): shapes that no probe covers still take an exact path."""
    g = torch.Generator().manual_seed(11)
    for k in range(1, 41):
        for m, n in ((1, 8), (17, 8), (33, 22), (64, 3)):
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
            for _ in range(2):
                assert torch.equal(ref_gemm(a, b).to(torch.int64), py_gemm(a, b)), (m, k, n)


# the longest K whose int32 sum the contract allows: K * 2**14 <= INT32_MAX
LONGEST_K = INT32_MAX >> 14


@pytest.mark.parametrize("k", [1, F32_EXACT_K - 1, F32_EXACT_K, F32_EXACT_K + 1, 3 * F32_EXACT_K + 7, LONGEST_K])
def test_gemm_f32_chunks_are_exact_at_the_extremes(k):
    """Every sign pattern of the extreme operands, at chunk edges and the longest K: == the exact sum."""
    rows = [torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8),
            torch.where(torch.arange(k) % 2 == 0, -128, 127).to(torch.int8),
            torch.where(torch.arange(k) % 3 == 0, 127, -128).to(torch.int8)]
    a = torch.stack(rows)
    want = [[sum(int(x) * int(y) for x, y in zip(ra.tolist(), rb.tolist())) if k < 5000 else
             int((ra.to(torch.int64) * rb.to(torch.int64)).sum()) for rb in rows] for ra in rows]
    assert _gemm_f32(a, a).tolist() == want
    assert _gemm_f32(a[None, None], a[None, None])[0, 0].tolist() == want         # batched, as per head


def test_gemm_f32_equals_int64_on_random_and_batched_operands():
    from ambert.sw.quant.ref import _gemm_f64
    g = torch.Generator().manual_seed(5)
    for shape_a, shape_b in (((33, 1536), (40, 1536)), ((2, 12, 128, 32), (2, 12, 128, 32)),
                             ((2, 12, 128, 128), (2, 12, 32, 128)), ((3, 2500), (5, 2500))):
        a = torch.randint(-128, 128, shape_a, dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, shape_b, dtype=torch.int8, generator=g)
        assert torch.equal(_gemm_f32(a, b).to(torch.int64), _gemm_f64(a, b))


def test_gemm_takes_the_float32_path_without_an_exact_int8_kernel(monkeypatch):
    """The path a CPU without VNNI runs: ref_gemm on shared weights through float32 chunks, the same
    bits; and float64 when float32 matmuls may run in a narrower type."""
    import ambert.sw.quant.ref as ref
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-128, 128, (17, 2100), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (9, 2100), dtype=torch.int8, generator=g)
    bias = torch.randint(-2**20, 2**20, (9,), dtype=torch.int32, generator=g)
    want = (ref._gemm_f64(a, b) + bias.to(torch.int64)).to(torch.int32)
    monkeypatch.setattr(ref, "_INT_MM_OK", False)
    called = []
    monkeypatch.setattr(ref, "_gemm_f32", lambda *x: called.append("f32") or ref_gemm_f32(*x))
    assert torch.equal(ref.ref_gemm(a, b, bias), want) and called == ["f32"]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert torch.equal(ref.ref_gemm(a, b, bias), want) and called == ["f32"]
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_int8_kernel_is_taken_only_where_exact_and_faster(monkeypatch):
    """The probe's rule: an exact kernel slower than the float32 path (AMD Zen 3's) is not taken."""
    import ambert.sw.quant.ref as ref
    for exact, int8_s, f32_s, want in ((True, 1.0, 2.0, True), (True, 2.0, 1.0, False), (False, 1.0, 2.0, False)):
        monkeypatch.setattr(ref, "_INT_MM_OK", None)
        monkeypatch.setattr(ref, "cpu_int_mm_exact", lambda exact=exact: exact)
        monkeypatch.setattr(ref, "_best_time", lambda gemm, *_: int8_s if gemm is torch._int_mm else f32_s)
        assert ref._cpu_int_mm_ok() is want


def test_gemm_matches_torch_int_mm_on_cpu():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-128, 128, (32, 1536), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (64, 1536), dtype=torch.int8, generator=g)
    assert torch.equal(ref_gemm(a, b), torch._int_mm(a, b.T.contiguous()))


def test_gemm_refuses_bad_operands():
    a8 = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        ref_gemm(a8.to(torch.int16), a8)
    with pytest.raises(ValueError, match="inner dimensions"):
        ref_gemm(a8, torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(OverflowError):
        ref_gemm(torch.full((1, 4), -128, dtype=torch.int8), torch.full((1, 4), -128, dtype=torch.int8),
                 torch.tensor([INT32_MAX], dtype=torch.int32))


# --- integer square root --------------------------------------------------------------------------------

def test_isqrt_exhaustive_small():
    n = torch.arange(0, 200_001, dtype=torch.int64)
    assert isqrt(n).tolist() == [math.isqrt(i) for i in range(200_001)]


def test_isqrt_large_and_edges():
    rng = random.Random(5)
    vals = [(1 << 62) - 1, 1 << 61, 0, 1, 2, 3, 4]
    for _ in range(2000):
        r = rng.randint(0, (1 << 31) - 1)
        vals += [r * r, r * r - 1 if r else 0, r * r + 1]
    vals += [rng.randint(0, (1 << 62) - 1) for _ in range(2000)]
    assert isqrt(torch.tensor(vals, dtype=torch.int64)).tolist() == [math.isqrt(v) for v in vals]


def test_isqrt_float_path_at_its_limit():
    # below 2**52 isqrt takes a float64 estimate and fixes it up: squares and their neighbours up there
    rng = random.Random(6)
    roots = [(1 << 26) - 1, (1 << 26) - 2] + [rng.randint(1 << 24, (1 << 26) - 1) for _ in range(3000)]
    vals = [v for r in roots for v in (r * r - 1, r * r, r * r + 1, r * r + 2 * r) if v < 1 << 52]
    vals.append((1 << 52) - 1)
    assert isqrt(torch.tensor(vals, dtype=torch.int64)).tolist() == [math.isqrt(v) for v in vals]


def test_isqrt_refuses_negative():
    with pytest.raises(ValueError):
        isqrt(torch.tensor([-1]))


# --- GELU ---------------------------------------------------------------------------------------------

def py_gelu(q, p):
    mag = min(abs(q), -p.b_int)
    poly = (mag + p.b_int) ** 2 + p.c_int
    minus_e = poly if q < 0 else -poly
    return q * ((minus_e - p.c_int) >> p.shift)


@pytest.mark.parametrize("scale", [30.0 / 32767, 8.0 / 32767, 1e-3, 1e-5])     # 1e-5: the int64 path
def test_gelu_matches_spec_on_every_int16(scale):
    p, _ = gelu_params(scale)
    q = torch.arange(INT16_MIN, INT16_MAX + 1, dtype=torch.int16)
    got = ref_gelu(q, p).tolist()
    assert got == [py_gelu(v, p) for v in range(INT16_MIN, INT16_MAX + 1)]


def test_gelu_fidelity_to_float():
    # measured against exact-erf GELU; I-BERT reports L_inf 0.018 for the polynomial
    scale = 12.0 / 32767
    p, out_scale = gelu_params(scale)
    q = torch.arange(INT16_MIN, INT16_MAX + 1, dtype=torch.int16)
    x = q.double() * scale
    err = (ref_gelu(q, p).double() * out_scale - torch.nn.functional.gelu(x)).abs().max()
    assert err < 0.02


def test_gelu_refuses_wrong_dtype():
    p, _ = gelu_params(1e-3)
    with pytest.raises(TypeError):
        ref_gelu(torch.zeros(3, dtype=torch.int32), p)


# --- softmax ------------------------------------------------------------------------------------------

def py_softmax(row, p, mask=None):
    mask = mask or [True] * len(row)
    live = [s for s, m in zip(row, mask) if m]
    if not live:
        return [0] * len(row)
    top = max(live)
    es = []
    for s, m in zip(row, mask):
        if not m:
            es.append(0)
            continue
        d = s - top
        z = (-d) >> p.m
        r = d + (z << p.m)
        poly = (r + p.b_int) ** 2 + p.c_int
        es.append(poly >> z if z <= 30 else 0)
    factor = (SOFTMAX_OUT_MAX << SOFTMAX_FACTOR_BITS) // sum(es)
    return [py_rshift_round(e * factor, SOFTMAX_FACTOR_BITS) for e in es]


@pytest.mark.parametrize("m", [4, 8, 10, 12, "wide"])
def test_softmax_matches_spec(m):
    if m == "wide":         # hand-made constants too wide for the int32 path: the int64 one runs
        p12 = softmax_params(12)
        p = SoftmaxParams(m=12, b_int=p12.b_int * 5, c_int=p12.c_int * 25)
        m = 12
    else:
        p = softmax_params(m)
    rng = random.Random(m)
    rows = [[rng.randint(INT16_MIN, INT16_MAX) for _ in range(37)] for _ in range(20)]
    rows += [[rng.randint(-3000, 3000) for _ in range(37)] for _ in range(20)]
    rows += [[5] * 37, [INT16_MAX] + [INT16_MIN] * 36, [INT16_MIN] * 37, [INT16_MAX] * 37,
             [0, 1] * 18 + [0], [100, 100] + [-100] * 35]
    masks = [[rng.random() < 0.8 for _ in range(37)] for _ in rows]
    masks[-1] = [False] * 37
    s = torch.tensor(rows, dtype=torch.int16)
    assert ref_softmax(s, p).tolist() == [py_softmax(r, p) for r in rows]
    got = ref_softmax(s, p, torch.tensor(masks)).tolist()
    assert got == [py_softmax(r, p, mk) for r, mk in zip(rows, masks)]


def test_softmax_edges():
    p = softmax_params(8)
    one_hot = ref_softmax(torch.tensor([[INT16_MAX] + [INT16_MIN] * 7], dtype=torch.int16), p)
    assert one_hot.tolist() == [[127] + [0] * 7]
    flat = ref_softmax(torch.zeros(1, 127, dtype=torch.int16), p)
    assert flat.tolist() == [[1] * 127]
    nothing = ref_softmax(torch.zeros(1, 4, dtype=torch.int16), p, torch.zeros(1, 4, dtype=torch.bool))
    assert nothing.tolist() == [[0] * 4]


def test_softmax_fidelity_to_float():
    m = 8
    p = softmax_params(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * 4
    q = torch.round(x / (math.log(2) / 2 ** m)).to(torch.int16)
    want = torch.softmax(q.double() * (math.log(2) / 2 ** m), dim=-1)
    err = (ref_softmax(q, p).double() / SOFTMAX_OUT_MAX - want).abs().max()
    assert err < 1.5 / SOFTMAX_OUT_MAX


# --- LayerNorm ----------------------------------------------------------------------------------------

def py_layernorm(row, gain, offset, shift, bits):
    c = len(row)
    mean = (2 * sum(row) + c) // (2 * c)
    y = [v - mean for v in row]
    var = (sum(t * t for t in y) << (2 * LN_STD_EXTRA_BITS)) // c
    std = max(1, math.isqrt(var))
    inv = (1 << (LN_NORM_BITS + LN_STD_EXTRA_BITS)) // std
    return [py_sat(py_rshift_round(t * inv * g + o, shift), bits) for t, g, o in zip(y, gain, offset)]


@pytest.mark.parametrize("c", [4, 64, 384, 1024])
def test_layernorm_matches_spec(c):
    g = torch.Generator().manual_seed(c)
    gamma = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.1
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    outs = [layernorm_params(gamma, beta, 0.05, 8), layernorm_params(gamma, beta, 3e-4, 16)]
    rows = [torch.randint(-(1 << 17) + 1, 1 << 17, (c,), generator=g) for _ in range(6)]
    rows += [torch.full((c,), 12345), torch.full((c,), (1 << 17) - 1), torch.zeros(c, dtype=torch.int64),
             torch.tensor([(1 << 17) - 1, -(1 << 17) + 1] * (c // 2)), torch.randint(-3, 4, (c,), generator=g)]
    v = torch.stack(rows).to(torch.int32)
    got = ref_layernorm(v, outs)
    for o, out in zip(outs, got):
        want = [py_layernorm(r.tolist(), o.gain.tolist(), o.offset.tolist(), o.shift, o.bits) for r in rows]
        assert out.tolist() == want


def test_layernorm_fidelity_to_float():
    c = 384
    g = torch.Generator().manual_seed(7)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
    x = torch.randn(16, c, generator=g) * 3
    x[:, 7] *= 40      # an outlier dimension, as BERT's residual stream has
    in_scale, out_scale = float(x.abs().max()) / 32767, 32.0 / 32767
    v = torch.round(x / in_scale).to(torch.int32)
    (out,) = ref_layernorm(v, [layernorm_params(gamma, beta, out_scale, 16)])
    want = torch.nn.functional.layer_norm(v.double() * in_scale, (c,), gamma.double(), beta.double(), eps=0)
    assert (out.double() * out_scale - want).abs().max() < 4 * out_scale


def test_layernorm_refuses_out_of_range_input():
    p = layernorm_params(torch.ones(4), torch.zeros(4), 0.1, 8)
    with pytest.raises(OverflowError):
        ref_layernorm(torch.tensor([[1 << 17, 0, 0, 0]], dtype=torch.int32), [p])
    with pytest.raises(TypeError):
        ref_layernorm(torch.zeros(1, 4, dtype=torch.int64), [p])
