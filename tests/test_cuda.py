"""The GPU fallback's arithmetic: the same ref_* code on CUDA (int8 GEMMs on torch._int_mm) gives the
same bits as the CPU. Skipped, not faked, where no CUDA GPU is visible."""

import pytest
import torch

from sw.quant.hf import encode
from sw.quant.ref import ref_gemm

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 7, 3), (17, 384, 384), (128, 1536, 384), (3, 3072, 9)])
def test_gemm_cuda_equals_cpu(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, generator=g)
    assert torch.equal(ref_gemm(a.cuda(), b.cuda(), bias.cuda()).cpu(), ref_gemm(a, b, bias))


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
    from sw.runtime import offload
    qm, model, tok = minilm
    enc = encode(tok, eval_sentences[:16])
    mod = offload(model, device="gpu", quantized=qm)
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert mod.last_stats.ops == {"gpu": qm.config["layers"]}
