"""The package's layering (docs/architecture.md, "Layers"): imports between the top-level folders run one
way, and the installed import names all live under ``ambert``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# each layer may import those before it, never one after
LAYERS = ["proto", "hw", "sim", "sw", "boards", "report"]


def _imports(path, package):
    """The top-level ambert subpackages that module ``path`` (in ``package``) imports, relative imports
    resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(package)          # a relative import stays in its own folder (no `..` is used)
                assert node.level == 1, f"{path}: relative import beyond its folder"
            elif node.module and node.module.startswith("ambert."):
                found.add(node.module.split(".")[1])
            elif node.module == "ambert":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ambert."):
                    found.add(alias.name.split(".")[1])
                elif alias.name.split(".")[0] in LAYERS:
                    found.add(f"top-level {alias.name}")
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_run_one_way(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    for path in sorted((ROOT / layer).rglob("*.py")):
        wrong = _imports(path, layer) - allowed
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}; {layer} may import {sorted(allowed)}"


def test_the_layers_are_the_folders():
    """Every top-level folder with Python code is a layer or sits above them all (tests, benchmarks) or
    is the package root."""
    folders = {d.name for d in ROOT.iterdir()
               if d.is_dir() and not d.name.startswith(".") and d.name != "build" and any(d.rglob("*.py"))}
    assert folders <= set(LAYERS) | {"ambert", "tests", "benchmarks"}, folders


def test_installed_names_live_under_ambert(tmp_path):
    """From a folder outside the checkout, the environment's Python finds ambert and its layers, and none
    of the folders as a top-level package of its own."""
    probe = ("import importlib, sys\n"
             "for name in ('hw', 'sw', 'sim', 'boards', 'proto'):\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except ModuleNotFoundError:\n"
             "        continue\n"
             "    sys.exit(f'top-level {name} is importable')\n"
             "import ambert, ambert.proto.isa, ambert.hw.top, ambert.sim.fastsim, ambert.sw.runtime, ambert.boards\n"
             "print(ambert.DeviceShape().lanes)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "16", run.stdout + run.stderr


def test_the_hardware_imports_no_torch(tmp_path):
    """``import ambert.hw`` (what a bitstream build and the benches load) brings in neither torch nor the
    host software."""
    probe = ("import sys, ambert.hw.top, ambert.hw.board\n"
             "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('ambert.sw'))\n"
             "sys.exit(f'loaded {bad}' if bad else 0)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
