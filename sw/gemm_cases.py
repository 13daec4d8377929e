"""GEMM test cases for the simulated and synthesized accelerator, and their golden results.

``random_case`` draws int8 operands with int32 biases and per-column requantization parameters that land
most outputs inside the mode's range and a few saturating; ``reference`` is the contract's ``ref_matmul``
(``ref_gemm`` + ``ref_requant``) on them.
"""

import numpy as np
import torch

from ambert.proto.contract import REQUANT_SHIFT_MAX
from ambert.proto.isa import MODE_BITS, Mode
from ambert.sw.quant.ref import ref_matmul

__all__ = ["random_case", "minilm_case", "reference"]


def random_case(rng, m, k, n, mode, extreme=False):
    """``(a, w, bias, m0, shift)`` for an ``m x k`` by ``n x k`` GEMM; ``extreme``: operands all -128/127."""
    if extreme:
        a = rng.choice(np.array([-128, 127], dtype=np.int8), size=(m, k))
        w = rng.choice(np.array([-128, 127], dtype=np.int8), size=(n, k))
    else:
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    bias = rng.integers(-2**20, 2**20, n).astype(np.int64)
    acc = np.abs(a.astype(np.int64) @ w.astype(np.int64).T + bias).max(axis=0) + 1
    m0 = rng.integers(1 << 30, 1 << 31, n)
    bits = 7 if mode == Mode.INT8 else 15
    # land most outputs inside the range, a few saturating, with a spread of shifts
    shift = np.clip(np.ceil(np.log2(acc)).astype(np.int64) + 31 - bits + rng.integers(-2, 3, n), 0,
                    REQUANT_SHIFT_MAX)
    return a, w, bias, m0, shift


def minilm_case(minilm, n_out, k_in=None):
    """``(a, w, bias, m0, shift)`` of real data: layer 0's Q projection of the quantized bundled MiniLM
    (``minilm`` = ``(QuantizedBert, fp32 model, tokenizer)``) on one sentence, its first ``n_out`` output
    channels and (``k_in``; default all) input features, INT8 as the model runs it."""
    from ambert.sw.quant.hf import encode
    qm, _, tok = minilm
    x8, _ = qm.embed(encode(tok, ["The quick brown fox jumps over the lazy dog near the river bank."])["input_ids"])
    p = qm.layers[0]
    per = lambda v: np.broadcast_to(np.asarray(v), (p.wq.shape[0],))[:n_out].astype(np.int64)   # noqa: E731
    k = slice(None, k_in)
    return (x8[0, :, k].numpy().astype(np.int8), p.wq[:n_out, k].numpy().astype(np.int8),
            p.bq[:n_out].numpy().astype(np.int64), per(p.q_m0), per(p.q_shift))


def reference(a, w, bias, m0, shift, mode):
    """The integer contract's result for a case: int8/int16 requantized, or the int32 ``a @ w.T + bias``."""
    return ref_matmul(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias.astype(np.int32)),
                      torch.from_numpy(m0), torch.from_numpy(shift), MODE_BITS[mode]).numpy()
