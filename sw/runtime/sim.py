"""The simulated accelerator: programs run on the Verilated top (sim/fastsim.py), its clock loop in C++."""

import subprocess

from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import DeviceShape

from .accel import AcceleratorDevice
from .base import DeviceError

__all__ = ["SimDevice", "DEFAULT_CONFIG"]

# The simulated device: a 16x16 array (256 MACs a cycle), four banks of 256 KiB.
DEFAULT_CONFIG = AcceleratorConfig(DeviceShape(lanes=16, banks=4, bank_words=16384, acc_depth=512))


class SimDevice(AcceleratorDevice):
    name = "sim"

    def __init__(self, config=DEFAULT_CONFIG, sim=None, waves=None):
        """``config``: the :class:`ambert.hw.config.AcceleratorConfig` to build and simulate; ``waves``: a
        ``.vcd`` or ``.fst`` path to dump every cycle to (a separate, traced build)."""
        super().__init__(config.shape)
        if sim is None:
            from ambert.sim.fastsim import FastSim
            kind = None if not waves else "fst" if str(waves).endswith(".fst") else "vcd"
            sim = FastSim(config, waves=kind)
            if waves:
                sim.open(waves)
        self.sim = sim

    def _reset_device(self):
        reset = getattr(self.sim, "reset", None)
        if reset:
            reset()

    def _run(self, words, expect):
        from ambert.sim.fastsim import SimHang
        try:
            result = self.sim.run(words, expect)
        except (SimHang, subprocess.CalledProcessError, OSError) as e:
            self._reset()       # the device may be stuck mid-command
            raise DeviceError(f"simulated device: {e}") from None
        if len(result.answers) != expect:
            self._reset()
            raise DeviceError(f"simulated device answered {len(result.answers)} words, expected {expect}")
        self.stats.cycles += result.cycles
        return result.answers
