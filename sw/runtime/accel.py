"""Devices that run the accelerator's instruction set — the simulated top and the boards: every GEMM +
requant of a layer is compiled (sw/compiler) into one program and run on the device; softmax, GELU and
LayerNorm run on the host (sw/compiler/layer.py). The pool persists between programs, so the weights the
layer schedule announces (``expect``) load while the previous GEMM computes, and a model's weights stay
where they were used while the pool has room (``Residency``): a repeated request, of this model or of
another sharing the device, does not send them over the host link again."""

import numpy as np
import torch

from ambert.proto.isa import MODE_BITS, PARAM_WORDS_PER_LANE_GROUP, Counters, Error, Program, parse_status
from ambert.sw.compiler.gemm import GemmOp, Residency, balanced, column_words, compile_gemms
from ambert.sw.quant.ref import ref_requant

from .base import Device, DeviceError, DeviceUnsupported

__all__ = ["AcceleratorDevice"]

_BITS_MODE = {bits: mode for mode, bits in MODE_BITS.items()}


def _as_numpy(t):
    return t.detach().cpu().numpy()


class AcceleratorDevice(Device):
    """A device behind the ISA of ``shape``. Subclasses provide ``_run(words, expect) -> answers`` (raise
    :class:`DeviceError` on a fault) and ``_reset_device()``."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.residency = Residency(shape)       # the pool's contents between programs
        self._expected = None
        self._retrying = False
        self.stats.array_macs_per_cycle = shape.lanes * shape.lanes

    def _expect(self, w, bias, m0, shift, bits, rows):
        k = w.shape[-1]
        self._expected = GemmOp(np.zeros((rows, k), dtype=np.int8), _as_numpy(w),
                                np.zeros(w.shape[0]) if bias is None else _as_numpy(bias),
                                _as_numpy(torch.as_tensor(m0)), _as_numpy(torch.as_tensor(shift)), _BITS_MODE[bits])

    def _k_chunk(self, k):
        """The depth of each partial GEMM when a weight column of depth ``k`` (plus its parameters) does not
        fit a pool bank; None when it fits. A chunk's column takes at most half a bank, so its weights
        stream beside the activations."""
        c, lanes = self.shape, self.shape.lanes
        if column_words(c, k) <= c.bank_words:
            return None
        most = (c.bank_words // 2 - PARAM_WORDS_PER_LANE_GROUP) // lanes
        if most < 1:
            raise DeviceUnsupported(f"K={k}: not even one k-tile of weights fits half a bank of "
                                    f"{c.bank_words} words")
        return balanced(-(-k // lanes), most) * lanes          # equal chunks, whole k-tiles

    def _split_k(self, a, w, bias, m0, shift, bits, chunk):
        """The GEMM as int32 partial GEMMs over K chunks on the device; their sum (acc + bias, which fits
        int32 by the contract) and the requantization on the host, with the contract's own ref_requant:
        the same bits. For a pool too small for the whole depth (an iCEBreaker's 256-word banks against
        MiniLM's K = 384)."""
        self._expected = None
        k = a.shape[-1]
        total = None
        for k0 in range(0, k, chunk):
            part = self.matmul(a[..., k0:k0 + chunk], w[..., k0:k0 + chunk], bias if k0 == 0 else None,
                               m0, shift, None).to(torch.int64)
            total = part if total is None else total + part
        acc = total.to(torch.int32)
        return acc if bits is None else ref_requant(acc, m0, shift, bits)

    def expect(self, w, bias, m0, shift, bits, rows):
        if column_words(self.shape, w.shape[-1]) <= self.shape.bank_words:
            self._expect(w, bias, m0, shift, bits, rows)      # (a GEMM split over K is not prefetched)

    def matmul(self, a, w, bias, m0, shift, bits):
        chunk = self._k_chunk(a.shape[-1])
        if chunk is not None:
            return self._split_k(a, w, bias, m0, shift, bits, chunk)
        if w.dim() == 2 and a.dim() > 2 and torch.as_tensor(m0).dim() <= 1 and torch.as_tensor(shift).dim() <= 1:
            # shared weights (a projection): every token is a row of one GEMM, weights loaded once
            out = self.matmul(a.reshape(-1, a.shape[-1]), w, bias, m0, shift, bits)
            return out.reshape(*a.shape[:-1], w.shape[0])
        mode = _BITS_MODE[bits]
        batch = torch.broadcast_shapes(a.shape[:-2], w.shape[:-2])
        m, n = a.shape[-2], w.shape[-2]
        out_shape = (*batch, m, n)
        a_b = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        w_b = w.expand(*batch, *w.shape[-2:]).reshape(-1, *w.shape[-2:])
        # the requant constants may differ per batch entry (per head) but never along M
        m0_b = torch.as_tensor(m0, dtype=torch.int64).expand(out_shape).reshape(-1, m, n)[:, 0]
        sh_b = torch.as_tensor(shift, dtype=torch.int64).expand(out_shape).reshape(-1, m, n)[:, 0]
        bias_np = np.zeros(n, dtype=np.int64) if bias is None else _as_numpy(bias).astype(np.int64)
        resident = w.dim() == 2           # a model's weights; batched ones are a request's keys and values
        ops = [GemmOp(_as_numpy(a_b[i]), _as_numpy(w_b[i]), bias_np, _as_numpy(m0_b[i]), _as_numpy(sh_b[i]), mode,
                      resident) for i in range(a_b.shape[0])]
        prefetch, self._expected = self._expected, None
        try:
            compiled = compile_gemms(self.shape, ops, self.residency, prefetch)
        except ValueError as e:
            self.residency.reset()          # the planner may hold half a program's ranges
            k_tiles = -(-a.shape[-1] // self.shape.lanes)
            if prefetch is not None:        # without the next GEMM's weights beside it, it may fit
                return self.matmul(a, w, bias, m0, shift, bits)
            if k_tiles > 1:                 # or in halves of its depth
                return self._split_k(a, w, bias, m0, shift, bits, -(-k_tiles // 2) * self.shape.lanes)
            raise DeviceUnsupported(str(e)) from None
        self.stats.pool_peak_words = max(self.stats.pool_peak_words, compiled.peak_words)
        self.stats.pool_naive_words = max(self.stats.pool_naive_words, compiled.naive_words)
        counters = Program(self.shape).counters()        # before and after: the cycles this program took
        words = counters.words + compiled.program.words + counters.words
        nc = Counters.WORDS
        try:
            answers = self._run(words, nc + compiled.program.expect + nc)
            outs, status = compiled.decode(answers[nc:-nc])
            flags = parse_status(status)
            if flags != Error(0):
                self._reset()
                raise DeviceError(f"device reported {flags!r}")
        except DeviceError:
            # The device was reset (a fault leaves nothing in the pool to trust). One more try, compiled
            # afresh for the empty pool: a device left mid-command by an earlier stream (a killed client,
            # a truncated program) is back in step after its reset, and this GEMM is not lost to the
            # fallback. A second failure is the device's: the runner moves on.
            if self._retrying:
                raise
            self._retrying = True
            try:
                out = self.matmul(a, w, bias, m0, shift, bits)
            finally:
                self._retrying = False
            self.stats.recovered += 1
            return out
        before, after = Counters.unpack(answers[:nc]), Counters.unpack(answers[-nc:])
        self.stats.busy_cycles += after.busy - before.busy
        self.stats.macs += int(np.prod(out_shape)) * a.shape[-1]
        self.stats.host_words += len(words) + len(answers)
        return torch.stack([torch.from_numpy(np.ascontiguousarray(o)) for o in outs]).reshape(out_shape)

    def _reset(self):
        """Start over from a clean device: after a fault nothing in the pool can be trusted."""
        self.residency.reset()
        self._reset_device()

    def _run(self, words, expect):
        raise NotImplementedError

    def _reset_device(self):
        raise NotImplementedError
