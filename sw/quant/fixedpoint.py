"""Turn real scale ratios into the integer constants of the contract (host side, once, at quantize time)."""

import math

import torch

from ambert.proto.contract import REQUANT_M0_BITS, REQUANT_SHIFT_MAX

from .ref import LN_NORM_BITS, GeluParams, LayerNormParams, SoftmaxParams

__all__ = ["multiplier", "multipliers", "gelu_params", "softmax_params", "layernorm_params",
           "GELU_A", "GELU_B"]

GELU_A, GELU_B = -0.2888, -1.769           # I-BERT's erf polynomial
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344  # I-BERT's exp polynomial on (-ln 2, 0]


def multiplier(real):
    """Return ``(m0, shift)`` with ``m0 * 2**-shift ~ real``, m0 in [2**30, 2**31) where the shift allows.

    ``real`` must be positive and below 2**31; very small ratios lose low bits of m0 so that the shift
    stays within the contract's ``REQUANT_SHIFT_MAX``.
    """
    top = 1 << REQUANT_M0_BITS
    if not (real > 0 and math.isfinite(real)):
        raise ValueError(f"requant ratio must be positive and finite, not {real!r}")
    frac, exp = math.frexp(real)                # real = frac * 2**exp, frac in [0.5, 1)
    m0, shift = round(frac * top), REQUANT_M0_BITS - exp
    if m0 == top:
        m0, shift = top >> 1, shift - 1
    if shift < 0:
        raise ValueError(f"requant ratio {real!r} is too large")
    if shift > REQUANT_SHIFT_MAX:
        m0, shift = round(m0 / (1 << (shift - REQUANT_SHIFT_MAX))), REQUANT_SHIFT_MAX
    if m0 == 0:
        raise ValueError(f"requant ratio {real!r} is too small for a {REQUANT_SHIFT_MAX}-bit shift")
    assert 0 < m0 < top
    return m0, shift


def multipliers(reals):
    """Per-channel :func:`multiplier`: float tensor [N] -> (int64 m0 [N], int64 shift [N])."""
    pairs = [multiplier(float(r)) for r in reals]
    return (torch.tensor([m for m, _ in pairs], dtype=torch.int64),
            torch.tensor([s for _, s in pairs], dtype=torch.int64))


def gelu_params(scale):
    """i-GELU constants for an int16 input at ``scale``; return (params, output scale)."""
    s2 = scale / math.sqrt(2)
    b_int = math.floor(GELU_B / s2)
    c_int = math.floor(1 / (GELU_A * s2 * s2))
    shift = max(0, (-c_int).bit_length() - 15)   # t = -E - c < -2c: keep it below 2**16
    out_scale = scale * -GELU_A * s2 * s2 * (1 << shift) / 2
    return GeluParams(b_int=b_int, c_int=c_int, shift=shift), out_scale


def softmax_params(m):
    """i-softmax constants for an int16 input at scale ln2 / 2**m."""
    if not 1 <= m <= 12:
        raise ValueError(f"softmax input fraction bits must be in [1, 12], not {m}")
    inv_s = (1 << m) / math.log(2)
    return SoftmaxParams(m=m, b_int=math.floor(EXP_B * inv_s), c_int=math.floor(EXP_C / EXP_A * inv_s ** 2))


def layernorm_params(gamma, beta, out_scale, bits):
    """Fold gamma, beta and the output scale (scalar or per channel) into one LayerNorm output.

    The shift is the largest that keeps ``n * gain + offset`` below 2**61 for any input (|n| <= sqrt(C)
    * 2**30), so the widest gain keeps about 31 - log2(sqrt C) bits.
    """
    c = gamma.shape[-1]
    ratio = gamma.detach().double() / out_scale                      # output steps per unit of y / std
    offset = beta.detach().double() / out_scale
    bound = float((ratio.abs() * math.sqrt(c) + offset.abs()).max())
    shift = max(0, min(REQUANT_SHIFT_MAX, 60 - math.ceil(math.log2(max(bound, 1.0)))))
    gain = torch.round(ratio * 2.0 ** (shift - LN_NORM_BITS)).to(torch.int64)
    off = torch.round(offset * 2.0 ** shift).to(torch.int64)
    return LayerNormParams(gain=gain, offset=off, shift=shift, bits=bits)
