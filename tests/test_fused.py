"""The fused CPU loops (sw/quant/fused.py) `==` the torch formulas of the reference, at the extremes, on
every int16 input, and on MiniLM's own activations."""

import contextlib

import pytest
import torch

from ambert.sw.quant import fixedpoint, ref
from ambert.sw.quant.ref import (INT16_MAX, INT16_MIN, INT32_MAX, INT32_MIN, LayerNormParams, ref_gelu_requant,
                                 ref_layernorm, ref_requant, ref_softmax)

pytest.importorskip("numba", reason="the fused loops need numba (a dependency of ambert)")


@contextlib.contextmanager
def torch_formulas():
    """Every CPU call on the torch formulas, as without numba."""
    saved, ref.FUSED = ref.FUSED, False
    try:
        yield
    finally:
        ref.FUSED = saved


def both(fn, *args):
    """``fn(*args)`` through the fused loops and through torch: the two results."""
    assert ref.FUSED
    fused = fn(*args)
    with torch_formulas():
        plain = fn(*args)
    return fused, plain


def equal(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_fused_loops_are_taken():
    from ambert.sw.quant import fused
    acc = torch.tensor([[5, -7]], dtype=torch.int32)
    assert ref._fused(acc) is fused and ref_requant(acc, 1 << 30, 31, 8).tolist() == [[3, -3]]


@pytest.mark.parametrize("bits", [8, 16])
def test_requant_at_the_extremes(bits):
    g = torch.Generator().manual_seed(bits)
    n = 64
    acc = torch.randint(INT32_MIN, INT32_MAX, (300, n), dtype=torch.int32, generator=g)
    acc[0], acc[1], acc[2] = INT32_MIN, INT32_MAX, 0
    acc[3, ::2] = -(1 << 20)              # exact ties: (x * m0) at a half step
    m0 = torch.randint(0, 1 << 31, (n,), generator=g)
    m0[:4] = torch.tensor([0, 1, (1 << 31) - 1, 1 << 30])
    shift = torch.randint(0, 63, (n,), generator=g)
    shift[:4] = torch.tensor([0, 62, 1, 31])
    for args in ((acc, m0, shift, bits), (acc, int(m0[2]), 62, bits), (acc, 1 << 30, 0, bits),
                 (acc[:, :1].reshape(3, 10, 10, 1), m0[:1], shift[:1], bits)):
        assert equal(*both(ref_requant, *args))


def test_requant_with_constants_per_head():
    """The attention context's constants, per head and channel ([H, 1, D] over [B, H, T, D]), and
    broadcasts the fused loop does not take (the torch formula serves those, through the same call)."""
    g = torch.Generator().manual_seed(5)
    acc = torch.randint(-10**6, 10**6, (2, 3, 5, 4), dtype=torch.int32, generator=g)
    m0 = torch.randint(1 << 30, 1 << 31, (3, 1, 4), generator=g)
    shift = torch.randint(25, 40, (3, 1, 4), generator=g)
    for args in ((m0, shift), (m0, 33), (m0[:, :, :1], shift), (m0[0], shift),
                 (torch.randint(1 << 30, 1 << 31, (2, 1, 1, 4), generator=g), 31),     # per batch entry
                 (torch.randint(1 << 30, 1 << 31, (3, 5, 1), generator=g), 31)):       # per row
        assert equal(*both(ref_requant, acc, *args, 8))


@pytest.mark.parametrize("int8_kernel", [True, False], ids=["int8-kernel", "float32"])
@pytest.mark.parametrize("k", [1, 64, 384, 1024, 1536, ref.INT32_MAX >> 14])
def test_matmul_with_its_bias_at_the_extremes(k, int8_kernel, monkeypatch):
    """ref_matmul adds the bias inside the fused requantization: the same bits, and the same
    OverflowError when a sum leaves int32, as ref_gemm's own check."""
    g = torch.Generator().manual_seed(k)
    m, n = 6, 9
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    a[0], w[0], w[1] = -128, -128, 127
    if int8_kernel and not ref.cpu_int_mm_exact():
        pytest.skip("this CPU's int8 kernel is not exact: the path never runs here")
    monkeypatch.setattr(ref, "_INT_MM_OK", int8_kernel)     # the int8 kernel even where float32 is faster
    room = min(2**20, ref.INT32_MAX - k * 16384)            # biases no product can push out of int32
    bias = torch.randint(-room, room + 1, (n,), dtype=torch.int32, generator=g)
    m0 = torch.randint(0, 1 << 31, (n,), generator=g)
    shift = torch.randint(0, 63, (n,), generator=g)
    for bits in (8, 16):
        assert equal(*both(ref.ref_matmul, a, w, bias, m0, shift, bits))
        assert equal(*both(ref.ref_matmul, a, w, None, m0, shift, bits))
    heads_a, heads_w = a[:4].reshape(2, 2, 1, k), w[:6].reshape(2, 3, k)       # batched, as attention's
    heads_w = heads_w.reshape(2, 1, 3, k).expand(2, 2, 3, k)
    assert equal(*both(ref.ref_matmul, heads_a, heads_w, None, m0[:3].reshape(1, 1, 3), 40, 16))
    near = torch.full((n,), ref.INT32_MAX - k * 16384 + 1, dtype=torch.int32)       # a[0] . w[0] overflows
    for fused in (True, False):
        ref.FUSED = fused
        try:
            with pytest.raises(OverflowError):
                ref.ref_matmul(a, w, near, m0, shift, 8)
        finally:
            ref.FUSED = True


@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.05, 0.2, 2.0])
def test_gelu_requant_on_every_int16(scale):
    p, out_scale = fixedpoint.gelu_params(scale)
    q = torch.arange(INT16_MIN, INT16_MAX + 1, dtype=torch.int16).reshape(-1, 256)
    g = torch.Generator().manual_seed(1)
    m0 = torch.randint(1 << 30, 1 << 31, (256,), generator=g)
    shift = torch.randint(20, 63, (256,), generator=g)
    assert equal(*both(ref_gelu_requant, q, p, m0, shift))


@pytest.mark.parametrize("m", range(1, 13))
def test_softmax_at_the_extremes(m):
    p = fixedpoint.softmax_params(m)
    g = torch.Generator().manual_seed(m)
    s = torch.randint(INT16_MIN, INT16_MAX + 1, (2, 3, 17, 33), dtype=torch.int16, generator=g)
    s[0, 0, 0] = INT16_MIN
    s[0, 0, 1] = INT16_MAX
    s[0, 0, 2, ::2] = INT16_MAX
    s[0, 0, 3] = torch.randint(-3, 1, (33,), generator=g, dtype=torch.int16)      # near-equal scores
    mask = torch.rand((2, 33), generator=g) < 0.7
    mask[1] = False                                                               # nothing left to attend
    assert equal(*both(ref_softmax, s, p))
    assert equal(*both(ref_softmax, s, p, mask[:, None, None, :]))     # per batch entry, read in place
    rows = torch.rand((2, 1, 17, 33), generator=g) < 0.7
    assert equal(*both(ref_softmax, s, p, rows))                       # per query row: expanded
    assert equal(*both(ref_softmax, s, p, mask[0]))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 2.0])
def test_requant_and_gelu_in_one_pass_at_the_extremes(scale):
    """FFN1's epilogue fused with the GELU (the arena's) `==` requant to int16, then gelu_requant: int32
    accumulators and biases at both ends, saturating the int16 step, and a sum that leaves int32."""
    from ambert.sw.quant import fused
    p, _ = fixedpoint.gelu_params(scale)
    g = torch.Generator().manual_seed(2)
    acc = torch.randint(INT32_MIN, INT32_MAX, (64, 96), dtype=torch.int32, generator=g)
    acc[0], acc[1], acc[2, ::2] = INT32_MAX, INT32_MIN, 0
    bias = torch.randint(-(1 << 20), 1 << 20, (96,), dtype=torch.int32, generator=g)
    bias[0] = 0                                         # column 0 keeps acc's extremes exactly
    m0 = torch.randint(0, 1 << 31, (96,), generator=g)
    shift = torch.randint(0, 63, (96,), generator=g)
    shift[:4] = torch.tensor([0, 1, 31, 62])
    g_m0, g_shift = torch.randint(1 << 30, 1 << 31, (96,), generator=g), torch.randint(20, 63, (96,), generator=g)
    acc[3:] = acc[3:].clamp(INT32_MIN + (1 << 20), INT32_MAX - (1 << 20))     # the rest: sums within int32
    acc[0, 1:] = acc[1, 1:] = 0
    with torch_formulas():
        want = ref_gelu_requant(ref_requant(acc.to(torch.int64).add(bias).to(torch.int32), m0, shift, 16), p,
                                g_m0, g_shift)
    constants = fused.requant_constants(m0, shift, bias, (1, 96))
    out = torch.empty((64, 96), dtype=torch.int8)
    fused.requant_gelu_rows(acc.numpy(), constants, p, fused.gelu_constants(g_m0, g_shift, 96), out.numpy())
    assert equal(out, want)
    acc[5, 7] = INT32_MAX                               # + a positive bias: past int32, as ref_gemm refuses
    bias[7] = 1
    with pytest.raises(OverflowError):
        fused.requant_gelu_rows(acc.numpy(), fused.requant_constants(m0, shift, bias, (1, 96)), p,
                                fused.gelu_constants(g_m0, g_shift, 96), out.numpy())


@pytest.mark.parametrize("m", [1, 6, 12])
def test_scores_requant_and_softmax_in_one_pass_at_the_extremes(m):
    """The attention scores' requantization fused with the softmax (the arena's, writing the float32
    probabilities over the scores) `==` requant to int16, then softmax: scores saturating both ends of
    int16, near-equal ones, a batch entry with every key masked."""
    from ambert.sw.quant import fused
    p = fixedpoint.softmax_params(m)
    g = torch.Generator().manual_seed(m)
    acc = torch.randint(-(1 << 24), 1 << 24, (2, 3, 17, 33), generator=g).to(torch.float32)
    acc[0, 0, 0], acc[0, 0, 1] = -(1 << 24), 1 << 24
    acc[0, 0, 3] = torch.randint(-3, 1, (33,), generator=g).to(torch.float32)
    mask = torch.rand((2, 33), generator=g) < 0.7
    mask[1] = False
    for m0, shift in ((1 << 30, 31), (1, 0), ((1 << 31) - 1, 40)):
        with torch_formulas():
            want = ref_softmax(ref_requant(acc.to(torch.int32), m0, shift, 16), p, mask[:, None, None, :])
        constants = fused.requant_constants(*(torch.tensor(x) for x in (m0, shift)), None, tuple(acc.shape))
        rows = acc.clone().reshape(-1, 33).numpy()
        keep, period = fused.softmax_keep(tuple(acc.shape), mask[:, None, None, :], rows.shape[0])
        fused.scores_softmax_rows(rows, constants, p, keep, period, ref.SOFTMAX_OUT_MAX, ref.SOFTMAX_FACTOR_BITS,
                                  rows)
        assert equal(torch.from_numpy(rows).reshape(acc.shape).to(torch.int8), want)


def _ln_params(c, seed, bits):
    g = torch.Generator().manual_seed(seed)
    gamma = torch.rand(c, generator=g, dtype=torch.float64) * 4 - 1
    beta = torch.rand(c, generator=g, dtype=torch.float64) - 0.5
    return fixedpoint.layernorm_params(gamma, beta, 0.02 if bits == 8 else 2e-4, bits)


@pytest.mark.parametrize("c", [1, 7, 384, 1024])
def test_layernorm_at_the_extremes(c):
    g = torch.Generator().manual_seed(c)
    v = torch.randint(-(1 << 17) + 1, 1 << 17, (40, c), dtype=torch.int32, generator=g)
    v[0] = (1 << 17) - 1                                    # a constant row: std 0, taken as 1
    v[1, ::2], v[1, 1::2] = (1 << 17) - 1, -(1 << 17) + 1   # the widest spread (var above 2**52 unshifted)
    v[2] = torch.randint(-2, 3, (c,), generator=g, dtype=torch.int32)
    outs = [_ln_params(c, 1, 8), _ln_params(c, 2, 16)]
    assert isinstance(outs[0], LayerNormParams)
    assert equal(*both(ref_layernorm, v, outs))
    assert equal(*both(ref_layernorm, v.reshape(4, 10, c), outs[1:]))
    v[5, c // 2] = 1 << 17                                  # one step past the residual range
    for fused in (True, False):
        with (contextlib.nullcontext() if fused else torch_formulas()), pytest.raises(OverflowError):
            ref_layernorm(v, outs)


def test_residual_add_and_layernorm_at_the_extremes():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(INT16_MIN, INT16_MAX + 1, (30, 384), dtype=torch.int16, generator=g)
    b = torch.randint(INT16_MIN, INT16_MAX + 1, (30, 384), dtype=torch.int16, generator=g)
    a[0], b[0] = INT16_MAX, INT16_MAX                       # the largest sum, far inside 2**17
    a[1], b[1] = INT16_MIN, INT16_MIN
    outs = [_ln_params(384, 4, 8), _ln_params(384, 5, 16)]
    fused, plain = both(ref.ref_add_layernorm, a, b, outs)
    assert equal(fused, plain) and equal(fused, ref_layernorm(a.to(torch.int32) + b.to(torch.int32), outs))
    wide = a.to(torch.int32) * 4                            # |v| up to 2**17: refused by both
    for fused in (True, False):
        with (contextlib.nullcontext() if fused else torch_formulas()), pytest.raises(OverflowError):
            ref.ref_add_layernorm(wide, b, outs)


def test_minilm_forward_is_the_same_through_the_fused_loops(minilm, eval_sentences):
    """The whole bundled model on real sentences, every intermediate of every layer compared."""
    from ambert.sw.quant.hf import encode
    qm, _, tok = minilm
    enc = encode(tok, eval_sentences[:12])
    x8, x16 = qm.embed(enc["input_ids"], enc["token_type_ids"])
    mask = enc["attention_mask"].to(torch.bool)
    for p in qm.layers:
        fused_trace, plain_trace = {}, {}
        out = ref.ref_layer(x8, x16, p, mask, fused_trace)
        with torch_formulas():
            ref.ref_layer(x8, x16, p, mask, plain_trace)
        assert fused_trace.keys() == plain_trace.keys()
        for key in fused_trace:
            assert equal(fused_trace[key], plain_trace[key]), key
        x8, x16 = out
