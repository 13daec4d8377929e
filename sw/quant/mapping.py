"""Artifacts' tensors mapped from their files, not copied; identical tensors mapped once.

:func:`map_tensors` reads an artifact once, in chunks, to check its SHA-256 (every byte: the digest covers
the whole file) and to take each tensor's own SHA-256; it then maps the file (``MAP_PRIVATE``: pages
shared with the page cache and with every other process mapping the file, copied only if a process
writes one) and returns tensors that are views of the mapping. Loading therefore adds no copy of the
weights: their pages become resident as a forward first touches them, and N processes serving one
artifact hold one copy between them.

A tensor whose bytes (dtype and shape too) equal a tensor already mapped in this process — the embedding
table a pruned variant shares with its base, say — is not mapped again: the earlier tensor is returned,
found by its content digest, unless it has been written to since (its version counter moved). The
registry holds weak references; a tensor no model uses any more is unmapped with its file.

Derived forms are not mapped: a backend that needs another layout (the compiler's fused Q/K/V weights,
a GPU copy) builds it on the fly in its own process.
"""

import hashlib
import json
import mmap
import threading
import weakref

import torch

__all__ = ["MappedArtifact", "map_tensors", "DTYPES"]

DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
          "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "BOOL": torch.bool}

_CHUNK = 1 << 20
_REGISTRY = {}                  # content digest -> weak reference to the mapped tensor
_LOCK = threading.Lock()


class MappedArtifact:
    """What :func:`map_tensors` found: ``tensors`` (name -> tensor), ``digests`` (name -> content SHA-256),
    ``shared`` (names of tensors another artifact already had mapped), ``file_digest`` (of the whole file
    with the bytes in ``unsigned`` replaced, as written) and ``header_bytes``."""

    def __init__(self, tensors, digests, shared, file_digest, stored_digest):
        self.tensors, self.digests, self.shared = tensors, digests, shared
        self.file_digest, self.stored_digest = file_digest, stored_digest


def _index(raw_header):
    """The safetensors header's tensor index: name -> (dtype, shape, begin, end) within the data."""
    index = {}
    for name, entry in json.loads(raw_header).items():
        if name == "__metadata__":
            continue
        index[name] = (entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
    return index


def map_tensors(path, digest_slot, unsigned):
    """Check and map the artifact at ``path`` (see the module's docstring).

    ``digest_slot(first_bytes_of_the_header)`` gives where the file's own digest lies (an offset from the
    start of the file, or None); those 64 bytes are hashed as ``unsigned`` (the file as written).
    Returns a :class:`MappedArtifact`; raises ValueError for a file whose safetensors header is not
    readable. The caller compares ``file_digest`` with ``stored_digest`` before using any tensor.
    """
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) < 8:
            raise ValueError("shorter than a safetensors header")
        header_len = int.from_bytes(size_bytes, "little")
        raw_header = f.read(header_len)
        if len(raw_header) != header_len:
            raise ValueError("truncated in its safetensors header")
        start = digest_slot(size_bytes + raw_header)
        if start is None:
            raise ValueError("its checksum cannot be found")
        stored = raw_header[start - 8:start - 8 + 64].decode("ascii", errors="replace")
        signed = bytearray(size_bytes + raw_header)
        signed[start:start + 64] = unsigned.encode()
        whole = hashlib.sha256(signed)
        try:
            index = _index(raw_header)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"its safetensors header is corrupted ({e})") from None
        data_start = 8 + header_len
        # the data section, in order of offset: each chunk goes into the file's digest and into the
        # digest of every tensor it overlaps
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in index.items())
        per_tensor = {name: hashlib.sha256(f"{dtype}{list(shape)}".encode())
                      for name, (dtype, shape, _, _) in index.items()}
        pos, buf = 0, bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            chunk = view[:n]
            whole.update(chunk)
            for begin, end, name in spans:
                if end <= pos or begin >= pos + n:
                    continue
                per_tensor[name].update(chunk[max(begin - pos, 0):min(end - pos, n)])
            pos += n
    digests = {name: h.hexdigest() for name, h in per_tensor.items()}
    file_digest = whole.hexdigest()
    if file_digest != stored:
        return MappedArtifact({}, digests, set(), file_digest, stored)
    if any(end > pos or begin > end for begin, end, _ in spans):
        raise ValueError("a tensor lies past the end of the file")
    tensors, shared = {}, set()
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if pos else None
    with _LOCK:
        for name, (dtype, shape, begin, end) in index.items():
            key = digests[name]
            ref, version = _REGISTRY.get(key, (None, None))
            known = ref() if ref is not None else None
            if known is not None and known._version == version:       # not written since it was mapped
                tensors[name] = known
                shared.add(name)
                continue
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name} has dtype {dtype}, which ambert does not read")
            kind = DTYPES[dtype]
            count = end - begin
            if count == 0:
                t = torch.empty(shape, dtype=kind)
            else:
                t = torch.frombuffer(mapping, dtype=kind, count=count // kind.itemsize,
                                     offset=data_start + begin).reshape(shape)
            tensors[name] = t
            _REGISTRY[key] = (weakref.ref(t, lambda _, key=key, forget=_forget: forget(key)), t._version)
    return MappedArtifact(tensors, digests, shared, file_digest, stored)


def _forget(key, registry=_REGISTRY, lock=_LOCK):
    # (the registry and lock bound here: at interpreter exit the module's globals may be gone first)
    with lock:
        ref, _ = registry.get(key, (None, None))
        if ref is not None and ref() is None:
            del registry[key]
