"""The GPU fallback: the same integer code on CUDA tensors (int8 GEMMs on torch._int_mm), same bits."""

import torch

from ambert.sw.quant.ref import ref_layer, ref_matmul

from .base import Device, DeviceError

__all__ = ["GpuDevice"]


class GpuDevice(Device):
    name = "gpu"

    def __init__(self, index=0):
        super().__init__()
        if not torch.cuda.is_available():
            raise DeviceError("no CUDA GPU is visible to torch on this machine")
        self.device = torch.device("cuda", index)
        self._params = {}       # layer params moved to the GPU once

    def _to(self, t):
        return None if t is None else t.to(self.device) if isinstance(t, torch.Tensor) else t

    def matmul(self, a, w, bias, m0, shift, bits):
        try:
            out = ref_matmul(*(self._to(t) for t in (a, w, bias, m0, shift)), bits)
            return out.cpu()
        except torch.cuda.OutOfMemoryError as e:
            raise DeviceError(f"GPU out of memory: {e}") from None

    def run_layer(self, p, x8, x16, mask, matmul=None, next_p=None):
        # the whole layer stays on the GPU; only its input and output cross PCIe
        key = id(p)
        if key not in self._params:
            from ambert.sw.quant.model import _map_tensors
            self._params[key] = _map_tensors(p, lambda t: t.to(self.device))
        count = 0

        def gpu_matmul(*args):
            nonlocal count
            count += 1
            return ref_matmul(*args)
        try:
            out = ref_layer(x8.to(self.device), x16.to(self.device), self._params[key],
                            None if mask is None else mask.to(self.device), matmul=gpu_matmul)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            raise DeviceError(f"GPU failed: {e}") from None
        self.stats.ops[self.name] = self.stats.ops.get(self.name, 0) + count     # matmuls, as the others count
        return tuple(t.cpu() for t in out)
