"""The fast simulated device: the Verilated accelerator top driven by a C++ clock loop (sim/harness.cpp).

``FastSim(config)`` builds the model once — a shared library cached under ``build/sim/<hash>`` by a hash
of the hardware sources, the configuration, the harness and the build flags — and loads it with ctypes.
``run(words, expect)`` sends an instruction stream and returns the answer words and the cycle count;
Python never touches a single cycle. The device persists between runs, as a board does: the pool keeps
its contents, and ``reset()`` pulses the reset (after a hang, say).
"""

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .verilator_env import verilator_env

__all__ = ["FastSim", "SimResult", "SimHang", "BoardSim", "sim_top", "verilog_of"]

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).with_name("harness.cpp")
BOARD_HARNESS = Path(__file__).with_name("board_harness.cpp")
# --x-initial 0: every register and memory starts at zero, as the Verilog's own initial values say (the
# zero memory initialisers are stripped below: one statement per word made builds minutes long)
FAST_HEADER = Path(__file__).with_name("verilated_fast.h")
# Measured on the 16x16 model (benchmarks/sim_speed.py): -O3 ~5% faster than the -O2 every other Verilated
# bench uses; -fno-semantic-interposition -fno-plt another ~5% (the model is a shared library, and without
# them every call between its functions goes through the PLT); verilated_fast.h's sign extension +25%.
OPT_FAST = "-O3 -fno-semantic-interposition -fno-plt"
VERILATOR_FLAGS = ["-O3", "--x-assign", "fast", "--x-initial", "0", "-Wno-fatal", "-Wno-WIDTHEXPAND",
                   "-Wno-WIDTHTRUNC", "--top-module", "top", "--compiler-include", str(FAST_HEADER)]
_ZERO_MEMORY_INIT = re.compile(r"  initial begin\n(?:    [\w$\\.]+\[\d+\] = \d+'[hdb]0+;\n)+  end\n")


class SimHang(RuntimeError):
    """The simulated device stopped taking input and answering while not busy, or ran out of cycles."""


@dataclass
class SimResult:
    answers: list
    cycles: int
    taken: int


def sim_top(config):
    """The accelerator with its reset taken through a flip-flop, as a board's reset synchroniser does.

    Verilator re-evaluates all logic that depends on a top-level input in every ``eval()``; with the reset
    pin feeding every register's next-state logic directly, that was most of the design, on top of the
    evaluation after the clock edge. Behind a register it is evaluated once a cycle. The reset acts one
    cycle later than the pin (the harness clocks once more after releasing it).
    """
    from amaranth import ClockDomain, ClockSignal, Module, ResetInserter, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In
    from ambert.hw.top import Accelerator

    accel = Accelerator(config)

    class SimTop(wiring.Component):
        def __init__(self):
            super().__init__({**accel.signature.members, "clk": In(1), "rst": In(1)})

        def elaborate(self, platform):
            m = Module()
            m.domains.sync = ClockDomain("sync", reset_less=True)
            m.d.comb += ClockSignal("sync").eq(self.clk)
            rst_q = Signal(init=1)
            m.d.sync += rst_q.eq(self.rst)
            m.submodules.accel = ResetInserter(rst_q)(accel)
            wiring.connect(m, wiring.flipped(self.i), accel.i)
            wiring.connect(m, accel.o, wiring.flipped(self.o))
            m.d.comb += [self.error.eq(accel.error), self.busy.eq(accel.busy)]
            return m

    return SimTop()


def verilog_of(config):
    """The accelerator's Verilog for simulation: Amaranth's output less its all-zero memory initialisers."""
    from amaranth.back import verilog
    return _ZERO_MEMORY_INIT.sub("", verilog.convert(sim_top(config), name="top"))


def _source_key(config, flags, harness=HARNESS):
    # the generated Verilog depends only on the hardware's sources (hw and the protocol it takes its
    # constants from) and the config: hash those, so a cached model costs no elaboration
    import ambert.hw
    import ambert.proto
    h = hashlib.sha256(repr(config).encode())
    sources = [path for package in (ambert.proto, ambert.hw)
               for path in sorted(Path(package.__file__).parent.glob("*.py"))]
    for path in sources + [harness, FAST_HEADER]:
        h.update(path.name.encode() + path.read_bytes())
    h.update(" ".join(flags + [OPT_FAST]).encode())
    return h.hexdigest()[:16]


def _build_library(folder, text, flags, harness, library, sources=(), opt_fast=OPT_FAST):
    """Verilate ``text`` (Verilog, top module ``top``) and any other ``sources`` with ``harness`` into the
    shared ``library``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "top.v").write_text(text)
    jobs = str(max(1, os.cpu_count() or 1))
    cmd = ["verilator", "--cc", "--exe", "--build", "-j", jobs, *flags, "-CFLAGS", "-fPIC",
           "-LDFLAGS", "-shared", "top.v", *map(str, sources), str(harness), "-o", library.name]
    run = subprocess.run(cmd, cwd=folder, env=verilator_env(OPT_FAST=opt_fast), capture_output=True, text=True)
    if run.returncode != 0 or not library.exists():
        raise RuntimeError(f"Verilator build failed in {folder}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def _cached_build(folder, library, verilog, flags, harness):
    """Build ``library``, inside the cache entry ``folder`` (keyed by everything it is built from), once
    for every process that asks for it; return whether this process built it.

    Processes that start at once serialize on a lock file beside the entry: the first builds in a
    staging folder of its own and publishes it with one rename; the others wait, then load what it
    built. A build that fails or is killed leaves no entry, so nothing half-built is ever loaded.
    ``verilog()`` makes the Verilog, only when a build is needed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {folder.name}...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return False
        staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".building", dir=folder.parent))
        try:
            _build_library(staging, verilog(), flags, harness, staging / library.relative_to(folder))
            if folder.exists():
                shutil.rmtree(folder)           # an entry from before builds were staged
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True


class FastSim:
    _handle = None
    def __init__(self, config, waves=None, build_root=None):
        """``waves``: None, ``"vcd"`` or ``"fst"`` — build the model able to dump that waveform format
        (FST needs the lz4 headers: Debian's liblz4-dev)."""
        self.config = config
        if waves not in (None, "vcd", "fst"):
            raise ValueError(f"waves must be None, 'vcd' or 'fst', not {waves!r}")
        if waves == "fst" and not Path("/usr/include/lz4.h").exists():
            raise RuntimeError("FST waveforms need the lz4 headers (apt-get install liblz4-dev); "
                               "or ask for a .vcd file")
        self.waves = waves
        # memories stay out of the trace (--trace-max-array): a 16x16 pool would add gigabytes a second
        flags = VERILATOR_FLAGS + ({"fst": ["--trace-fst", "-CFLAGS", "-DAMBERT_WAVES_FST"],
                                    "vcd": ["--trace", "-CFLAGS", "-DAMBERT_WAVES_VCD"]}.get(waves, []))
        if waves:
            flags += ["--trace-max-array", "32"]
        self.dir = Path(build_root or ROOT / "build" / "sim") / _source_key(config, flags)
        self.library = self.dir / "obj_dir" / "libambert_sim.so"
        self.built = not self.library.exists() and _cached_build(self.dir, self.library,
                                                                 lambda: verilog_of(config), flags, HARNESS)
        self._load()

    @classmethod
    def from_library(cls, config, library):
        """Drive an already built model of ``config``'s top (``sim/harness.cpp`` linked in): a
        post-synthesis netlist, say (:mod:`ambert.boards.postsynth`)."""
        self = cls.__new__(cls)
        self.config, self.waves, self.library = config, None, Path(library)
        self._load()
        return self

    def _load(self):
        self._lib = lib = ctypes.CDLL(str(self.library))
        u64, u64p, vp = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p
        lib.ambert_open.restype, lib.ambert_open.argtypes = vp, [ctypes.c_char_p]
        lib.ambert_run.restype = ctypes.c_int
        lib.ambert_run.argtypes = [vp, ctypes.POINTER(ctypes.c_uint32), u64, u64, u64, u64, u64p, u64p, u64p]
        lib.ambert_fetch.argtypes = [vp, ctypes.POINTER(ctypes.c_uint32)]
        lib.ambert_reset.argtypes = lib.ambert_close.argtypes = [vp]
        self.waves_path = None
        self._handle = None
        self.cycles = 0          # since the model was opened

    def open(self, waves_path=None):
        """Start the device (done by the first ``run``); ``waves_path`` dumps every cycle to it."""
        if waves_path and not self.waves:
            raise ValueError("build the FastSim with waves='vcd' or 'fst' to dump a waveform")
        self.close()
        self._handle = self._lib.ambert_open(str(waves_path).encode() if waves_path else None)
        self.waves_path = waves_path
        return self

    def reset(self):
        if self._handle is None:
            self.open()
        self._lib.ambert_reset(self._handle)

    def close(self):
        if self._handle is not None:
            self._lib.ambert_close(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    def run(self, words, expect, max_cycles=2_000_000_000, idle_limit=10_000):
        """Send ``words``; wait for ``expect`` answers. Raises :class:`SimHang` if the device stops."""
        import numpy as np
        if self._handle is None:
            self.open()
        buf = np.ascontiguousarray(words, dtype=np.uint32)
        cycles, taken, count = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
        status = self._lib.ambert_run(self._handle, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), len(buf),
                                      expect, max_cycles, idle_limit, ctypes.byref(cycles), ctypes.byref(taken),
                                      ctypes.byref(count))
        answers = np.zeros(count.value, dtype=np.uint32)
        if count.value:
            self._lib.ambert_fetch(self._handle, answers.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)))
        self.cycles += cycles.value
        if status:
            why = "ran out of cycles" if status == 1 else f"went idle for {idle_limit} cycles"
            raise SimHang(f"device {why} after {cycles.value} cycles: took {taken.value}/{len(buf)} words, "
                          f"answered {count.value}/{expect}")
        return SimResult(answers=answers.tolist(), cycles=cycles.value, taken=taken.value)


class BoardSim:
    """The virtual board's hardware: the Verilated :class:`ambert.hw.board.BoardTop` — UART PHY, link endpoint,
    accelerator — with its clock loop in C++ (sim/board_harness.cpp); bytes in and out at the line level.

    ``run(data)`` drives the bytes onto the board's ``rx`` pin, runs while the board has work in hand (at
    most ``max_cycles`` once the input is in) and returns the bytes it sent on ``tx``; ``quiet`` then
    says whether the board had nothing left to do. ``reset()`` is the
    board's reset button. ``divisor``: clock cycles per UART bit (4, the least the PHY takes, runs the
    line fastest); ``retry_cycles``: the link's retransmission timeout.
    """

    def __init__(self, config, divisor=4, retry_cycles=100_000, build_root=None):
        from ambert.hw.board import BoardTop
        self.config, self.divisor, self.retry_cycles = config, divisor, retry_cycles
        flags = VERILATOR_FLAGS
        key = _source_key((config, divisor, retry_cycles), flags, BOARD_HARNESS)
        self.dir = Path(build_root or ROOT / "build" / "board") / key
        self.library = self.dir / "obj_dir" / "libambert_board.so"

        def board_verilog():
            from amaranth.back import verilog
            text = verilog.convert(BoardTop(config, divisor=divisor, retry_cycles=retry_cycles), name="top")
            return _ZERO_MEMORY_INIT.sub("", text)
        self.built = not self.library.exists() and _cached_build(self.dir, self.library, board_verilog, flags,
                                                                 BOARD_HARNESS)
        self._lib = lib = ctypes.CDLL(str(self.library))
        u64, u64p, vp, u8p = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_char_p
        lib.board_open.restype, lib.board_open.argtypes = vp, [ctypes.c_int]
        lib.board_run.restype = ctypes.c_int
        lib.board_run.argtypes = [vp, u8p, u64, ctypes.c_void_p, u64, u64, u64p, u64p]
        lib.board_reset.argtypes = lib.board_close.argtypes = [vp]
        self._handle = lib.board_open(divisor)
        self.cycles = 0
        self.quiet = False

    def run(self, data=b"", max_cycles=20_000):
        data = bytes(data)
        cap = (len(data) * 10 * self.divisor + max_cycles) // (10 * self.divisor) + 64
        out = ctypes.create_string_buffer(cap)
        n, cycles = ctypes.c_uint64(), ctypes.c_uint64()
        status = self._lib.board_run(self._handle, data, len(data), out, cap, max_cycles, ctypes.byref(n),
                                     ctypes.byref(cycles))
        self.cycles += cycles.value
        if status == 1:
            raise RuntimeError("the virtual board sent more than its output buffer holds")
        self.quiet = status == 0
        return out.raw[:n.value]

    def reset(self):
        self._lib.board_reset(self._handle)

    def close(self):
        if self._handle is not None:
            self._lib.board_close(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
