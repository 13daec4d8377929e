"""One interface for every backend, and the runner that falls back from one backend to the next."""

import warnings
from dataclasses import dataclass, field

from ambert.sw.compiler.layer import run_layer
from ambert.sw.quant.ref import ref_layer

__all__ = ["Device", "DeviceError", "DeviceUnsupported", "Stats", "Runner"]


class DeviceError(RuntimeError):
    """The device failed while running work (error status, hang, dead process, lost link)."""


class DeviceUnsupported(ValueError):
    """The device cannot take this operation (too large for its pool, not in its instruction set)."""


@dataclass
class Stats:
    """What one run cost on the accelerator (zeros for backends that do not count cycles)."""
    cycles: int = 0             # device clock cycles, transfers included
    busy_cycles: int = 0        # cycles the MATMUL engine ran
    pool_peak_words: int = 0    # most pool words any program held at once (liveness-planned)
    pool_naive_words: int = 0   # most pool words any program would need if nothing were reused
    macs: int = 0               # useful multiply-accumulates offloaded
    array_macs_per_cycle: int = 0
    host_words: int = 0         # 32-bit words moved over the host link, both ways
    recovered: int = 0          # programs that failed once and ran again after a device reset
    ops: dict = field(default_factory=dict)     # how many matmuls each backend ran

    @property
    def efficiency(self):
        """Useful MACs per array slot while the engine ran."""
        slots = self.busy_cycles * self.array_macs_per_cycle
        return self.macs / slots if slots else 0.0

    @property
    def overall_efficiency(self):
        """Useful MACs per array slot over every device cycle, transfers included."""
        slots = self.cycles * self.array_macs_per_cycle
        return self.macs / slots if slots else 0.0

    def latency_s(self, clock_hz):
        """Modeled latency at a board's clock."""
        return self.cycles / clock_hz

    def reset(self):
        """Zero the counts (the array shape stays)."""
        self.__init__(array_macs_per_cycle=self.array_macs_per_cycle)

    def merge(self, other):
        self.cycles += other.cycles
        self.busy_cycles += other.busy_cycles
        self.macs += other.macs
        self.host_words += other.host_words
        self.recovered += other.recovered
        self.pool_peak_words = max(self.pool_peak_words, other.pool_peak_words)
        self.pool_naive_words = max(self.pool_naive_words, other.pool_naive_words)
        self.array_macs_per_cycle = self.array_macs_per_cycle or other.array_macs_per_cycle
        for k, v in other.ops.items():
            self.ops[k] = self.ops.get(k, 0) + v


class Device:
    """A backend. ``matmul`` is the contract's :func:`ref_matmul` (GEMM + requant) computed on the device;
    ``run_layer`` runs a whole encoder layer and by default runs the device schedule of the contract's
    dataflow (:func:`sw.compiler.layer.run_layer`) with ``matmul`` on the device and the rest (softmax,
    GELU, LayerNorm) on the host; ``expect`` is its hint of the weights a later ``matmul`` will use."""

    name = "device"

    def __init__(self):
        self.stats = Stats()

    def matmul(self, a, w, bias, m0, shift, bits):
        raise NotImplementedError

    def expect(self, w, bias, m0, shift, bits, rows):
        """A later ``matmul`` will use these weights for ``rows`` rows; a device may start loading them."""

    def run_layer(self, p, x8, x16, mask, matmul=None, next_p=None):
        return run_layer(p, x8, x16, mask, matmul or self.matmul, expect=self.expect, next_p=next_p)

    def close(self):
        """Release what the device holds (processes, memory)."""


class Runner:
    """Run layers on ``devices[0]``; an operation it cannot take, or one during which it fails, runs again
    on the next device, with a warning. The last device must never fail (the CPU reference)."""

    def __init__(self, devices):
        if not devices:
            raise ValueError("no devices to run on")
        self.devices = list(devices)
        self.stats = Stats()

    def _matmul_from(self, start):
        def matmul(a, w, bias, m0, shift, bits):
            for i in range(start, len(self.devices)):
                dev = self.devices[i]
                try:
                    out = dev.matmul(a, w, bias, m0, shift, bits)
                except DeviceUnsupported as e:
                    self._fall_back(dev, i, f"cannot take a {tuple(a.shape)} x {tuple(w.shape)} GEMM ({e})", e)
                    continue
                except DeviceError as e:
                    self._fall_back(dev, i, f"failed ({e})", e)
                    continue
                self.stats.ops[dev.name] = self.stats.ops.get(dev.name, 0) + 1
                return out
        return matmul

    def _fall_back(self, dev, i, why, error):
        if i + 1 >= len(self.devices):
            raise DeviceError(f"{dev.name} {why}, and there is no device to fall back to") from error
        warnings.warn(f"{dev.name} {why}; running it on {self.devices[i + 1].name}", RuntimeWarning, stacklevel=4)

    def layer_fn(self, params):
        """A ``layer_fn`` for :meth:`QuantizedBert.forward_int`."""
        def run(i, x8, x16, mask):
            first = self.devices[0]
            try:
                return first.run_layer(params[i], x8, x16, mask, matmul=self._matmul_from(0),
                                       next_p=params[i + 1] if i + 1 < len(params) else None)
            except DeviceError as e:
                self._fall_back(first, 0, f"failed on layer {i} ({e})", e)
                return ref_layer(x8, x16, params[i], mask, matmul=self._matmul_from(1))
        return run

    def collect_stats(self):
        total = Stats()
        for dev in self.devices:
            total.merge(dev.stats)          # ops a device counted itself (a whole layer on the GPU)
        for k, v in self.stats.ops.items():  # ops the runner handed out one by one
            total.ops[k] = total.ops.get(k, 0) + v
        return total
