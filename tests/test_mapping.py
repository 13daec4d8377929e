"""Artifacts mapped, not copied (sw/quant/mapping.py): no second copy while loading, identical tensors
mapped once, the file never written through, and every byte still checked."""

import subprocess
import sys

import torch

from ambert.sw.quant import artifact


def _tensors(qm):
    out = {"word": qm.word, "position": qm.position, "token_type": qm.token_type}
    for i, p in enumerate(qm.layers):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "bq", "b1"):
            out[f"layers.{i}.{name}"] = getattr(p, name)
    return out


def test_a_model_loaded_twice_is_mapped_once(tiny, tmp_path):
    path = artifact.save(tiny[0], tmp_path / "tiny.safetensors")
    first, second = artifact.load(path), artifact.load(path)
    for name, t in _tensors(first).items():
        assert _tensors(second)[name] is t, name                  # found by its content digest
    assert torch.equal(first.forward(torch.tensor([[2, 5, 7, 3]])), second.forward(torch.tensor([[2, 5, 7, 3]])))


def test_a_variant_shares_the_tensors_it_holds_identically(tiny, tmp_path):
    """A variant with one layer's FFN weights changed: the embedding tables and every other weight are the
    base's tensors; the changed one is its own."""
    import dataclasses
    base_qm = tiny[0]
    layer = base_qm.layers[0]
    changed = dataclasses.replace(layer, w1=torch.flip(layer.w1, dims=[0]).contiguous())
    variant_qm = dataclasses.replace(base_qm, layers=[changed, *base_qm.layers[1:]])
    base = artifact.load(artifact.save(base_qm, tmp_path / "base.safetensors"))
    variant = artifact.load(artifact.save(variant_qm, tmp_path / "variant.safetensors"))
    b, v = _tensors(base), _tensors(variant)
    assert v["word"] is b["word"] and v["layers.0.wq"] is b["layers.0.wq"] and v["layers.1.w1"] is b["layers.1.w1"]
    assert v["layers.0.w1"] is not b["layers.0.w1"] and torch.equal(v["layers.0.w1"], changed.w1)


def test_a_pruned_model_shares_the_embedding_tables_of_its_base(tiny, pruned, tmp_path):
    """`ambert prune` keeps the embeddings: the pruned artifact's tables are mapped once with its base's."""
    base = artifact.load(artifact.save(tiny[0], tmp_path / "base.safetensors"))
    small = artifact.load(artifact.save(pruned[0], tmp_path / "pruned.safetensors"))
    assert small.word is base.word and small.position is base.position and small.token_type is base.token_type
    assert small.layers[0].wq.shape != base.layers[0].wq.shape or small.layers[1].w1.shape != base.layers[1].w1.shape


def test_writing_a_loaded_tensor_never_writes_the_file(tiny, tmp_path):
    path = artifact.save(tiny[0], tmp_path / "tiny.safetensors")
    before = path.read_bytes()
    qm = artifact.load(path)
    qm.word.fill_(7)                                    # copy-on-write: this process's page only
    assert path.read_bytes() == before
    again = artifact.load(path)                         # the written tensor is not handed out again
    assert again.word is not qm.word and torch.equal(again.word, tiny[0].word)


_PEAK = """
import sys
from pathlib import Path
def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
from ambert.sw.quant import artifact
artifact.read_header(sys.argv[1])          # imports done, the header's cost counted in the baseline
base = kib("VmRSS")
qm = artifact.load(sys.argv[1])
print(kib("VmHWM") - base)
"""


def test_loading_adds_no_second_copy(minilm, tmp_path):
    """Peak RSS while loading the bundled MiniLM's artifact, above the process's baseline, is at most 1.1x
    its tensor bytes (a copying load needs 2x: the file read, then the tensors)."""
    path = artifact.save(minilm[0], tmp_path / "minilm.safetensors")
    data = path.read_bytes()
    tensor_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")      # the safetensors data section
    run = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    added = int(run.stdout.split()[-1]) * 1024
    assert added <= 1.1 * tensor_bytes, (added, tensor_bytes)


def test_a_model_gone_leaves_no_mapping_behind(tiny, tmp_path):
    """Once a model is dropped, its file is unmapped: what the CPU paths remember of its constants (the
    checked requant constants, the fused kernels' prepared arrays, the arena's per-layer constants) holds
    none of its tensors."""
    import gc
    from ambert.sw.runtime.cpu import CpuDevice
    path = artifact.save(tiny[0], tmp_path / "gone.safetensors")

    def mapped():
        with open("/proc/self/maps") as f:
            return sum(str(path) in line for line in f)

    qm = artifact.load(path)
    ids, mask = torch.tensor([[2, 5, 7, 3], [2, 6, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    dev = CpuDevice()

    def layer_fn(i, x8, x16, m, layers=qm.layers):
        return dev.run_layer(layers[i], x8, x16, m)
    arena = qm.forward_int(ids, mask, layer_fn=layer_fn)
    assert torch.equal(arena, qm.forward_int(ids, mask))                 # the arena and the reference, both run
    assert mapped()
    del qm, layer_fn
    gc.collect()
    assert mapped() == 0
