"""The quantized-model artifact: safetensors tensors plus a JSON header with every integer constant.

Layout: one ``.safetensors`` file. Its metadata holds two keys: ``ambert``, a JSON document::

    {"format": "ambert-quantized-bert", "version": 2, "config": {...}, "source": {...},
     "scales": {...}, "constants": {"layers.0.score_m0": ..., ...}, "tensors": {name: [dtype, shape]}}

and ``ambert_sha256``, the SHA-256 of the whole file as written with that digest's own 64 characters
zeroed: every byte a result depends on — the safetensors header, the ambert header's constants, scales
and config, the tensor index and data — is covered, so any change to any byte is refused.

Files are written to a temporary name and renamed, so a crash never leaves half a model behind. Loading
checks the digest first (reading the file once, in chunks), then the format, version, and every tensor's
dtype and shape against the config, and refuses the file with an :class:`ArtifactError` naming the
problem. Files of an older format version are refused with a request to quantize again, never read by old
rules. The tensors of a loaded model are mapped from the file, not copied (:mod:`.mapping`): processes
serving one artifact share its pages, and a tensor two artifacts hold identically is mapped once.

A model pruned by weight tiles (``source["pruning"]["tiles_zeroed"]``) stores each weight matrix that
has all-zero ``lanes x lanes`` tiles as ``<name>.tiles`` (its non-zero tiles, [count, lanes, lanes],
n-tile-major, the matrix's edge tiles zero-padded) and ``<name>.mask`` (uint8 [n-tiles, k-tiles], 1 where
a tile is stored), listed in the header's ``tile_sparse``; loading rebuilds the matrix (a copy, not
mapped) after checking that the mask fits the matrix, the tiles fit the mask, and the padding is zero.
"""

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path

import torch

from .model import QuantizedBert
from .ref import LayerParams

__all__ = ["FORMAT", "VERSION", "ArtifactError", "save", "load", "stored_weights", "tiles_of"]

FORMAT = "ambert-quantized-bert"
VERSION = 2
DIGEST_KEY = "ambert_sha256"
_UNSIGNED = "0" * 64               # the digest's place while the file is hashed


class ArtifactError(ValueError):
    """A quantized-model file that cannot be used; the message names the file and the problem."""


def _flatten(obj, prefix, tensors, constants):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous().cpu()
        elif dataclasses.is_dataclass(value):
            _flatten(value, key + ".", tensors, constants)
        elif isinstance(value, int):
            constants[key] = value
        else:
            raise TypeError(f"cannot store field {key} of type {type(value).__name__}")


def _build(cls, prefix, tensors, constants):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        if kind is torch.Tensor:
            kwargs[f.name] = tensors.pop(key)
        elif dataclasses.is_dataclass(kind):
            kwargs[f.name] = _build(kind, key + ".", tensors, constants)
        else:
            kwargs[f.name] = int(constants.pop(key))
    return cls(**kwargs)


def _digest_slot(data):
    """Where the digest's 64 characters lie in the file's bytes (its safetensors header), or None."""
    if len(data) < 8:
        return None
    header_end = 8 + int.from_bytes(data[:8], "little")
    key = f'"{DIGEST_KEY}":"'.encode()
    at = data.find(key, 8, header_end)
    if at < 0 or data.find(key, at + 1, header_end) >= 0:
        return None
    start = at + len(key)
    return start if start + 64 <= header_end else None


def _file_digest(data, start):
    h = hashlib.sha256()
    h.update(memoryview(data)[:start])
    h.update(_UNSIGNED.encode())
    h.update(memoryview(data)[start + 64:])
    return h.hexdigest()


def _split(qm):
    tensors, constants = {}, {}
    top = {f.name: getattr(qm, f.name) for f in dataclasses.fields(qm)}
    for name in ("word", "position", "token_type"):
        tensors[name] = top[name].detach().contiguous().cpu()
    _flatten(qm.emb_ln_x8, "emb_ln_x8.", tensors, constants)
    _flatten(qm.emb_ln_x16, "emb_ln_x16.", tensors, constants)
    for i, layer in enumerate(qm.layers):
        _flatten(layer, f"layers.{i}.", tensors, constants)
    return tensors, constants


_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2")


def tiles_of(w, lanes):
    """A matrix [N, K] as its ``lanes x lanes`` tiles, [n-tiles, k-tiles, lanes, lanes], the edge tiles
    zero-padded; and which of them hold a non-zero value, [n-tiles, k-tiles]."""
    n, k = w.shape
    nt, kt = -(-n // lanes), -(-k // lanes)
    padded = torch.zeros(nt * lanes, kt * lanes, dtype=w.dtype)
    padded[:n, :k] = w
    tiles = padded.reshape(nt, lanes, kt, lanes).permute(0, 2, 1, 3)
    return tiles, tiles.ne(0).flatten(2).any(dim=2)


def _tile_sparse(tensors, lanes):
    """Replace each weight matrix with zero tiles by its stored tiles and mask (see the module docstring);
    return the names replaced."""
    names = []
    for name in [n for n in tensors if n.startswith("layers.") and n.rsplit(".", 1)[1] in _WEIGHTS]:
        tiles, mask = tiles_of(tensors[name], lanes)
        if bool(mask.all()):
            continue
        del tensors[name]
        tensors[f"{name}.tiles"] = tiles[mask].contiguous()
        tensors[f"{name}.mask"] = mask.to(torch.uint8).contiguous()
        names.append(name)
    return names


def _dense_from_tiles(path, name, tensors, shape, lanes):
    tiles, mask = tensors.pop(f"{name}.tiles", None), tensors.pop(f"{name}.mask", None)
    if tiles is None or mask is None:
        raise ArtifactError(f"{path}: {name} is stored by tiles but its tiles or mask is missing")
    n, k = shape
    nt, kt = -(-n // lanes), -(-k // lanes)
    if tuple(mask.shape) != (nt, kt) or mask.dtype != torch.uint8 or bool((mask > 1).any()):
        raise ArtifactError(f"{path}: the tile mask of {name} is {tuple(mask.shape)} {mask.dtype}, not the 0/1 "
                            f"uint8 ({nt}, {kt}) a {n}x{k} matrix of {lanes}x{lanes} tiles has")
    keep = mask.bool()
    if tuple(tiles.shape) != (int(keep.sum()), lanes, lanes) or tiles.dtype != torch.int8:
        raise ArtifactError(f"{path}: {name} stores tiles of shape {tuple(tiles.shape)} {tiles.dtype}; its mask "
                            f"asks for ({int(keep.sum())}, {lanes}, {lanes}) int8")
    full = torch.zeros(nt, kt, lanes, lanes, dtype=torch.int8)
    full[keep] = tiles
    padded = full.permute(0, 2, 1, 3).reshape(nt * lanes, kt * lanes)
    if bool(padded[n:].any()) or bool(padded[:, k:].any()):
        raise ArtifactError(f"{path}: the tiles of {name} hold non-zero weights outside its {n}x{k} matrix")
    return padded[:n, :k].contiguous()


def stored_weights(qm):
    """The encoder's weight and bias tensors as :func:`save` stores them, by name."""
    tensors = {k: v for k, v in _split(qm)[0].items()
               if k.startswith("layers.") and k.rsplit(".", 1)[1] in _WEIGHTS + ("bq", "bk", "bv", "bo", "b1", "b2")}
    pruning = qm.source.get("pruning") or {}
    if pruning.get("tiles_zeroed"):
        _tile_sparse(tensors, int(pruning["lanes"]))
    return tensors


def save(qm, path):
    """Write ``qm`` to ``path`` atomically; return the path."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors, constants = _split(qm)
    pruning = qm.source.get("pruning") or {}
    sparse = (dict(lanes=int(pruning["lanes"]), weights=_tile_sparse(tensors, int(pruning["lanes"])))
              if pruning.get("tiles_zeroed") else None)
    header = dict(format=FORMAT, version=VERSION, config=qm.config, source=qm.source, scales=qm.scales,
                  constants=constants, **({"tile_sparse": sparse} if sparse else {}),
                  tensors={k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"ambert": json.dumps(header), DIGEST_KEY: _UNSIGNED})
        data = bytearray(tmp.read_bytes())
        start = _digest_slot(data)
        data[start:start + 64] = _file_digest(data, start).encode()
        tmp.write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _expected_shapes(cfg):
    from .model import layer_dims
    c, d = cfg["hidden"], cfg["hidden"] // cfg["heads"]
    shapes = {"word": (cfg["vocab"], c), "position": (cfg["max_positions"], c),
              "token_type": (cfg["type_vocab"], c)}
    dims = layer_dims(cfg)
    if len(dims) != cfg["layers"] or any(not (0 < h <= cfg["heads"] and 0 < f) for h, f in dims):
        raise ArtifactError(f"the per-layer shapes {dims} do not fit a {cfg['layers']}-layer model of "
                            f"{cfg['heads']} heads")
    for i, (heads, ffn) in enumerate(dims):
        a = heads * d
        for w, (n, k) in dict(wq=(a, c), wk=(a, c), wv=(a, c), wo=(c, a), w1=(ffn, c), w2=(c, ffn)).items():
            shapes[f"layers.{i}.{w}"] = (n, k)
            shapes[f"layers.{i}.b{w[1]}"] = (n,)
    return shapes


def read_header(path):
    """Return the JSON header of an artifact without loading its tensors."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"quantized model {path} is a folder; name the .safetensors file `ambert quantize` "
                            f"wrote")
    if not path.is_file():
        raise ArtifactError(f"quantized model {path} does not exist (make one with `ambert quantize`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:     # safetensors raises its own error types for truncated/garbled files
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    if "ambert" not in meta:
        raise ArtifactError(f"{path} is a safetensors file but not an ambert quantized model")

    try:
        header = json.loads(meta["ambert"])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} has a corrupted ambert header: {e}") from None
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ArtifactError(f"{path} was written in format version {header.get('version')}; this ambert reads "
                            f"version {VERSION} (whose checksum covers every byte): run `ambert quantize` again")
    if DIGEST_KEY not in meta:
        raise ArtifactError(f"{path} is corrupted: its checksum is missing")
    return header


def load(path, device="cpu"):
    """Read and validate an artifact; return the :class:`QuantizedBert` on ``device``."""
    from .mapping import map_tensors
    path = Path(path)
    header = read_header(path)
    try:
        mapped = map_tensors(path, _digest_slot, _UNSIGNED)
    except (OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path} is corrupted: {e}") from None
    if mapped.file_digest != mapped.stored_digest:
        raise ArtifactError(f"{path} is corrupted: its bytes do not match the checksum it was written with "
                            f"(header, constants or tensor data changed or damaged)")
    tensors = dict(mapped.tensors)
    declared = header.get("tensors", {})
    if set(declared) != set(tensors):
        missing, extra = set(declared) - set(tensors), set(tensors) - set(declared)
        raise ArtifactError(f"{path}: tensors do not match the header (missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(extra)[:5]})")
    cfg = header["config"]
    expected = _expected_shapes(cfg)
    sparse = header.get("tile_sparse")
    if sparse is not None:
        try:
            lanes, names = int(sparse["lanes"]), list(sparse["weights"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: its tile_sparse record is malformed") from None
        if lanes < 1 or any(n not in expected or n.rsplit(".", 1)[1] not in _WEIGHTS for n in names):
            raise ArtifactError(f"{path}: its tile_sparse record names {lanes}-lane tiles of {names[:3]}, not "
                                f"weight matrices of this model")
        for name in names:
            tensors[name] = _dense_from_tiles(path, name, tensors, expected[name], lanes)
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{path}: tensor {name} is missing for a {cfg['layers']}-layer model")
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the config "
                                f"says {shape}")
    constants = dict(header["constants"])
    try:
        emb_x8 = _build_ln("emb_ln_x8.", tensors, constants)
        emb_x16 = _build_ln("emb_ln_x16.", tensors, constants)
        layers = [_build(LayerParams, f"layers.{i}.", tensors, constants) for i in range(cfg["layers"])]
    except KeyError as e:
        raise ArtifactError(f"{path}: constant or tensor {e} is missing") from None
    from .model import layer_dims
    for i, (p, (heads, _)) in enumerate(zip(layers, layer_dims(cfg))):
        if p.heads != heads:
            raise ArtifactError(f"{path}: layer {i} says {p.heads} heads, the config {heads}")
    qm = QuantizedBert(config=cfg, source=header["source"], word=tensors.pop("word"),
                       position=tensors.pop("position"), token_type=tensors.pop("token_type"),
                       emb_ln_x8=emb_x8, emb_ln_x16=emb_x16, layers=layers, scales=header["scales"])
    return qm if device == "cpu" else qm.to(device)


def _build_ln(prefix, tensors, constants):
    from .ref import LayerNormParams
    return _build(LayerNormParams, prefix, tensors, constants)
