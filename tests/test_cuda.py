"""The GPU fallback's arithmetic: the same ref_* code on CUDA (int8 GEMMs on torch._int_mm) gives the
same bits as the CPU. Skipped, not faked, where no CUDA GPU is visible."""

import pytest
import torch

from ambert.sw.quant.hf import encode
from ambert.sw.quant.ref import ref_gemm

pytestmark = pytest.mark.cuda


# (24, 24, 32) and (17, 16, 32): small K that cuBLASLt refused with a row-major B on an H200
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 7, 3), (24, 24, 32), (17, 16, 32), (17, 384, 384),
                                     (128, 1536, 384), (3, 3072, 9)])
def test_gemm_cuda_equals_cpu(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, generator=g)
    assert torch.equal(ref_gemm(a.cuda(), b.cuda(), bias.cuda()).cpu(), ref_gemm(a, b, bias))


@pytest.mark.parametrize("shape_a, shape_b", [((2, 12, 17, 32), (2, 12, 24, 32)),     # QK^T per head
                                              ((1, 12, 128, 128), (1, 12, 32, 128)),  # PV per head
                                              ((3, 5, 8), (1, 7, 8))])                # broadcast batch
def test_batched_gemm_cuda_equals_cpu(shape_a, shape_b):
    g = torch.Generator().manual_seed(sum(shape_a))
    a = torch.randint(-128, 128, shape_a, dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, shape_b, dtype=torch.int8, generator=g)
    assert torch.equal(ref_gemm(a.cuda(), b.cuda()).cpu(), ref_gemm(a, b))


def test_gemm_cuda_extremes():
    a = torch.full((20, 3072), -128, dtype=torch.int8)
    assert torch.equal(ref_gemm(a.cuda(), a.cuda()).cpu(), ref_gemm(a, a))


def test_minilm_cuda_equals_cpu(minilm, eval_sentences):
    qm, _, tok = minilm
    enc = encode(tok, eval_sentences[:32])
    cpu = qm.forward_int(enc["input_ids"], enc["attention_mask"])
    gpu = qm.to("cuda").forward_int(enc["input_ids"].cuda(), enc["attention_mask"].cuda())
    assert torch.equal(gpu.cpu(), cpu)


def test_gpu_runtime_equals_cpu(minilm, eval_sentences):
    from ambert.sw.runtime import offload
    qm, model, tok = minilm
    enc = encode(tok, eval_sentences[:16])
    mod = offload(model, device="gpu", quantized=qm)
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    # Q, K, V, scores, context, attention output, FFN up and down: 8 matmuls a layer, all on the GPU
    assert mod.last_stats.ops == {"gpu": 8 * qm.config["layers"]}
