"""The fast simulated device: the Verilated accelerator top driven by a C++ clock loop (sim/harness.cpp).

``FastSim(config)`` builds the model once — cached under ``build/sim/<hash>`` by a hash of the hardware
sources, the configuration, the harness and the build flags — and ``run(words, expect)`` sends an instruction stream
and returns the answer words and the cycle count. Python never touches a single cycle.
"""

import hashlib
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .verilator_env import verilator_env

__all__ = ["FastSim", "SimResult", "SimHang", "verilog_of"]

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).with_name("harness.cpp")
# --x-initial 0: every register and memory starts at zero, as the Verilog's own initial values say (the
# zero memory initialisers are stripped below: one statement per word made builds minutes long)
VERILATOR_FLAGS = ["-O3", "--x-assign", "fast", "--x-initial", "0", "-Wno-fatal", "-Wno-WIDTHEXPAND",
                   "-Wno-WIDTHTRUNC", "--top-module", "top"]
_ZERO_MEMORY_INIT = re.compile(r"  initial begin\n(?:    [\w$\\.]+\[\d+\] = \d+'[hdb]0+;\n)+  end\n")


class SimHang(RuntimeError):
    """The simulated device stopped taking input and answering while not busy, or ran out of cycles."""


@dataclass
class SimResult:
    answers: list
    cycles: int
    taken: int


def verilog_of(config):
    """The accelerator's Verilog for simulation: Amaranth's output less its all-zero memory initialisers."""
    from amaranth.back import verilog
    from hw.top import Accelerator
    return _ZERO_MEMORY_INIT.sub("", verilog.convert(Accelerator(config), name="top"))


def _source_key(config, flags):
    # the generated Verilog depends only on the hw sources and the config: hash those, so a cached model
    # costs no elaboration
    h = hashlib.sha256(repr(config).encode())
    for path in sorted((ROOT / "hw").glob("*.py")) + [HARNESS]:
        h.update(path.name.encode() + path.read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


class FastSim:
    def __init__(self, config, waves=False, build_root=None):
        self.config = config
        self.waves = waves
        flags = VERILATOR_FLAGS + (["--trace-fst", "-CFLAGS", "-DAMBERT_WAVES"] if waves else [])
        self.dir = Path(build_root or ROOT / "build" / "sim") / _source_key(config, flags)
        self.binary = self.dir / "obj_dir" / "Vtop"
        if not self.binary.exists():
            self._build(verilog_of(config), flags)

    def _build(self, text, flags):
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "top.v").write_text(text)
        jobs = str(max(1, os.cpu_count() or 1))
        cmd = ["verilator", "--cc", "--exe", "--build", "-j", jobs, *flags, "top.v", str(HARNESS),
               "-o", "Vtop"]
        run = subprocess.run(cmd, cwd=self.dir, env=verilator_env(), capture_output=True, text=True)
        if run.returncode != 0 or not self.binary.exists():
            raise RuntimeError(f"Verilator build failed in {self.dir}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")

    def run(self, words, expect, max_cycles=2_000_000_000, idle_limit=10_000, waves_path=None):
        """Send ``words``; wait for ``expect`` answers. Raises :class:`SimHang` if the device stops."""
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            src.write_bytes(struct.pack(f"<{len(words)}I", *words))
            args = [str(self.binary), str(src), str(dst), str(expect), str(max_cycles), str(idle_limit)]
            if waves_path:
                if not self.waves:
                    raise ValueError("build the FastSim with waves=True to dump a waveform")
                args.append(str(waves_path))
            subprocess.run(args, check=True)
            raw = dst.read_bytes()
        status, taken, cycles, n = struct.unpack_from("<IIQI", raw)
        answers = list(struct.unpack_from(f"<{n}I", raw, 20))
        if status:
            why = "ran out of cycles" if status == 1 else f"went idle for {idle_limit} cycles"
            raise SimHang(f"device {why} after {cycles} cycles: took {taken}/{len(words)} words, "
                          f"answered {n}/{expect}")
        return SimResult(answers=answers, cycles=cycles, taken=taken)
