"""The CPU backend: the integer reference itself."""

from ambert.sw.quant.ref import ref_matmul

from .base import Device

__all__ = ["CpuDevice"]


class CpuDevice(Device):
    name = "cpu"

    def matmul(self, a, w, bias, m0, shift, bits):
        return ref_matmul(a, w, bias, m0, shift, bits)
