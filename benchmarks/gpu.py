#!/usr/bin/env python3
"""GPU fallback: bit-identity with the CPU reference, and throughput against HF fp16, batch 32, seq 128.

Needs a CUDA GPU (run it where one is lent). Last line:

    gpu: int8_sentences_per_s=... fp16_sentences_per_s=... bit_identical=True
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; none is visible to torch here")
    from ambert.sw.quant.quantize import quantize_pretrained, read_sentences
    from ambert.sw.runtime import offload

    qm, model, tok = quantize_pretrained(progress=False)
    sentences = read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")
    batch = (sentences * 4)[:32]
    enc = tok(batch, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    mod = offload(model, device="gpu", quantized=qm)
    cpu = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    gpu = mod(**enc).last_hidden_state
    ran = mod.last_stats.ops
    if set(ran) != {"gpu"}:       # the runtime fell back: a GPU figure would be a lie
        raise SystemExit(f"the layers did not all run on the GPU ({ran}); see the warnings above")
    identical = torch.equal(gpu, cpu)
    fp16 = model.half().cuda().eval()
    enc_cuda = {k: v.cuda() for k, v in enc.items()}

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    with torch.no_grad():
        t_int = timed(lambda: mod(**enc_cuda))
        t_fp16 = timed(lambda: fp16(**enc_cuda))
    print(f"{torch.cuda.get_device_name()}: integer model {t_int * 1e3:.1f} ms/batch, HF fp16 {t_fp16 * 1e3:.1f} "
          f"ms/batch (batch 32, seq 128)")
    print(f"gpu: int8_sentences_per_s={32 / t_int:.1f} fp16_sentences_per_s={32 / t_fp16:.1f} "
          f"bit_identical={identical}")


if __name__ == "__main__":
    main()
