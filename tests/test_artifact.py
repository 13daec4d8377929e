"""The quantized-model artifact: exact round trip, and refusal of broken files."""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from ambert.sw.quant import artifact
from ambert.sw.quant.artifact import ArtifactError
from conftest import fuzz_examples


def main_info(path):
    """``ambert info`` the way the command line runs it: the error it raises inside."""
    from ambert.sw.cli import cmd_info
    from types import SimpleNamespace
    return cmd_info(SimpleNamespace(artifact=path))


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact(tiny, tmp_path):
    qm = tiny[0]
    path = artifact.save(qm, tmp_path / "m.safetensors")
    _assert_same(qm, artifact.load(path))
    assert not list(tmp_path.glob(".*tmp*"))


def test_minilm_round_trip_is_exact(minilm, tmp_path):
    qm = minilm[0]
    _assert_same(qm, artifact.load(artifact.save(qm, tmp_path / "minilm.safetensors")))


@pytest.fixture()
def saved(tiny, tmp_path):
    return artifact.save(tiny[0], tmp_path / "m.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.load(tmp_path / "nope.safetensors")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        artifact.load(saved)


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00\x01 this is not a model" * 10)
    with pytest.raises(ArtifactError):
        artifact.load(p)


def test_flipped_byte_in_tensor_data(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        artifact.load(saved)


def _rewrite(path, edit_header=None, edit_tensors=None, sign=False):
    """Write the artifact again with its header or tensors edited: unsigned (as a hand edit would leave
    it), or with a valid checksum (a well-formed file whose contents disagree, as a faulty writer's)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["ambert"])
    tensors = load_file(str(path))
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    metadata = {"ambert": json.dumps(header)}
    if sign:
        metadata[artifact.DIGEST_KEY] = "0" * 64
    save_file(tensors, str(path), metadata=metadata)
    if sign:
        data = bytearray(path.read_bytes())
        start = artifact._digest_slot(data)
        data[start:start + 64] = artifact._file_digest(data, start).encode()
        path.write_bytes(data)


def test_plain_safetensors_is_not_a_model(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(p))
    with pytest.raises(ArtifactError, match="not an ambert"):
        artifact.load(p)


def test_other_format_version(saved):
    _rewrite(saved, edit_header=lambda h: h.update(version=99))
    with pytest.raises(ArtifactError, match="version 99"):
        artifact.load(saved)


def test_config_that_does_not_match_the_tensors(saved):
    def edit(h):
        h["config"]["hidden"] += 1
    _rewrite(saved, edit_header=edit, sign=True)
    with pytest.raises(ArtifactError, match="shape"):
        artifact.load(saved)


def test_missing_tensor(saved):
    def edit_t(t):
        del t["layers.0.wq"]

    def edit_h(h):
        del h["tensors"]["layers.0.wq"]
    _rewrite(saved, edit_header=edit_h, edit_tensors=edit_t)
    with pytest.raises(ArtifactError, match="checksum"):
        artifact.load(saved)


def test_failed_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = tmp_path / "m.safetensors"
    with pytest.raises(OSError):
        artifact.save(tiny[0], target)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(tiny, tmp_path, monkeypatch):
    import safetensors.torch
    target = artifact.save(tiny[0], tmp_path / "m.safetensors")
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        artifact.save(tiny[0], target)
    assert target.read_bytes() == before


def test_a_changed_header_constant_is_refused(saved):
    """One digit of one integer constant in the JSON header, edited in place: the file stays a valid
    safetensors file with a valid header, and is refused."""
    data = saved.read_bytes()
    old, new = b'"layers.0.score_shift": ', None
    at = data.index(old.replace(b'"', b'\\"')) if old not in data else data.index(old)
    digit = at + len(old) + (2 if old not in data else 0)
    while not chr(data[digit]).isdigit():
        digit += 1
    new = bytearray(data)
    new[digit] = ord("1") if data[digit] != ord("1") else ord("2")
    saved.write_bytes(bytes(new))
    with pytest.raises(ArtifactError, match="corrupted"):
        artifact.load(saved)
    with pytest.raises(ArtifactError, match="corrupted"):
        main_info(saved)


def test_a_changed_scale_is_refused(saved):
    data = bytearray(saved.read_bytes())
    at = data.index(b"scales")
    digit = next(i for i in range(at, len(data)) if chr(data[i]).isdigit() and chr(data[i - 1]) != "\\")
    data[digit] = ord("7") if data[digit] != ord("7") else ord("3")
    saved.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        artifact.load(saved)


def test_an_older_format_is_refused_with_a_request_to_quantize_again(saved):
    _rewrite(saved, edit_header=lambda h: h.update(version=1))
    with pytest.raises(ArtifactError, match=r"format version 1.*run `ambert quantize` again"):
        artifact.load(saved)


def test_a_missing_checksum_is_refused(saved):
    _rewrite(saved)
    with pytest.raises(ArtifactError, match="checksum is missing"):
        artifact.load(saved)


FUZZ_CASES = fuzz_examples(150)


def test_fuzz_truncations_and_byte_flips_are_refused(saved):
    """Random truncations and single-byte changes anywhere in the file: each is refused with an
    ArtifactError, none loads: 150 of them, ``AMBERT_FUZZ=<factor>`` times more."""
    data = saved.read_bytes()
    rng = random.Random(27)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for case in range(FUZZ_CASES):
        if case % 5 == 0:
            damaged = data[:rng.randrange(len(data))]
        else:
            # half the changes in the headers, where a flip is most likely to leave a readable file
            at = rng.randrange(header_end) if case % 2 else rng.randrange(len(data))
            damaged = bytearray(data)
            damaged[at] ^= 1 << rng.randrange(8)
        saved.write_bytes(bytes(damaged))
        with pytest.raises(ArtifactError):
            artifact.load(saved)
    saved.write_bytes(data)
    artifact.load(saved)


def _tile_pruned(qm):
    """``qm`` with a third of every weight matrix's 4x4 tiles zeroed, recorded as a tile pruning."""
    layers = []
    for p in qm.layers:
        zeroed = {}
        for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            w = getattr(p, name).clone()
            for t in range(0, w.shape[0], 4):
                for j in range(0, w.shape[1], 4):
                    if (t + j) % 3 == 0:
                        w[t:t + 4, j:j + 4] = 0
            zeroed[name] = w
        layers.append(dataclasses.replace(p, **zeroed))
    return dataclasses.replace(qm, layers=layers, source=dict(qm.source, pruning=dict(tiles_zeroed=1, lanes=4)))


def test_a_tile_pruned_model_stores_only_its_non_zero_tiles(tiny, tmp_path):
    qm = _tile_pruned(tiny[0])
    sparse, dense = artifact.save(qm, tmp_path / "s.safetensors"), artifact.save(tiny[0], tmp_path / "d.safetensors")
    stored = load_file(str(sparse))
    assert "layers.0.w1" not in stored and stored["layers.0.w1.mask"].dtype == torch.uint8
    assert sparse.stat().st_size < dense.stat().st_size
    _assert_same(artifact.load(sparse), qm)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({"layers.0.w1.mask": t["layers.0.w1.mask"][:-1].clone()}), "tile mask of layers.0.w1 is"),
    (lambda t: t.update({"layers.0.w1.tiles": t["layers.0.w1.tiles"][1:].clone()}), "stores tiles of shape"),
    (lambda t: t.pop("layers.0.w1.mask"), "tiles or mask is missing"),
])
def test_a_tile_mask_that_does_not_match_its_tensor_is_refused(tiny, tmp_path, damage, message):
    path = artifact.save(_tile_pruned(tiny[0]), tmp_path / "sparse.safetensors")

    def edit_h(h):
        h["tensors"] = {k: v for k, v in h["tensors"].items() if k in stored}
    stored = load_file(str(path))
    damage(stored)
    _rewrite(path, edit_header=edit_h, edit_tensors=lambda t: (t.clear(), t.update(stored)), sign=True)
    with pytest.raises(ArtifactError, match=message):
        artifact.load(path)
