"""The CPU backend: the integer reference itself, each layer's activations in this thread's arena."""

from ambert.sw.quant.ref import ref_matmul

from .arena import ActivationArena, thread_arena
from .base import Device

__all__ = ["CpuDevice"]

MATMULS_PER_LAYER = 6           # merged Q/K/V, Q.K^T, P.V, output projection, FFN1, FFN2


class CpuDevice(Device):
    """``arena``: run whole layers in the calling thread's :class:`ActivationArena` (default), else one
    operation at a time as the contract's functions allocate them."""

    name = "cpu"

    def __init__(self, arena=True):
        super().__init__()
        self.arena = arena

    def matmul(self, a, w, bias, m0, shift, bits):
        return ref_matmul(a, w, bias, m0, shift, bits)

    def run_layer(self, p, x8, x16, mask, matmul=None, next_p=None):
        if not (self.arena and ActivationArena.takes(x8, p)):
            return super().run_layer(p, x8, x16, mask, matmul, next_p)
        out = thread_arena().run_layer(p, x8, x16, mask, last=next_p is None)
        self.stats.ops[self.name] = self.stats.ops.get(self.name, 0) + MATMULS_PER_LAYER
        return out
