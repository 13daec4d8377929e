"""Several quantized models under one memory budget.

A :class:`ModelPool` knows each model's artifact and maps it (:func:`ambert.sw.quant.artifact.load`: the
weights mapped from the file, not copied) when it is asked for. The budget counts the tensor bytes of the
models mapped: before mapping one, the least recently used are evicted (dropped, so their mappings go)
until it fits; a model larger than the whole budget is refused when it is added. The count is taken
from each artifact's declared tensor sizes, before any sharing between models is known, so the pool is
never over budget — it may be under it by what two models share.

A model handed out stays mapped for as long as the caller holds it, evicted or not: serve a request with
the model :meth:`ModelPool.get` returns, then let it go.
"""

import threading
from collections import OrderedDict
from pathlib import Path

__all__ = ["ModelPool", "PoolError"]


class PoolError(ValueError):
    """A model the pool cannot hold: unknown, or larger than the whole budget."""


def tensor_bytes(header):
    """The bytes of every tensor an artifact's header declares."""
    import math
    import torch
    total = 0
    for name, (dtype, shape) in header["tensors"].items():
        kind = getattr(torch, str(dtype), None)
        if not isinstance(kind, torch.dtype):
            raise PoolError(f"tensor {name} has dtype {dtype!r}: not an ambert artifact's")
        total += kind.itemsize * math.prod(shape)
    return total


class ModelPool:
    """``budget``: bytes of mapped weights the pool may hold at once (None: no limit).

    ``add(name, path)`` registers an artifact (its header checked now, its tensors mapped when first
    asked for); ``get(name)`` returns its :class:`ambert.sw.quant.model.QuantizedBert`, mapping it (and
    evicting the least recently used) as needed. ``bytes_in_use``, ``evictions`` and ``loads`` say what
    the pool has done. Thread-safe.
    """

    def __init__(self, budget=None):
        if budget is not None and budget <= 0:
            raise ValueError(f"the memory budget must be a positive number of bytes, not {budget}")
        self.budget = budget
        self._paths, self._sizes = {}, {}
        self._loaded = OrderedDict()            # name -> model, least recently used first
        self._lock = threading.Lock()
        self.evictions = self.loads = 0

    def add(self, name, path):
        from ambert.sw.quant.artifact import read_header
        header = read_header(Path(path))
        size = tensor_bytes(header)
        if self.budget is not None and size > self.budget:
            raise PoolError(f"model {name!r} ({path}) needs {size:,} bytes of weights, more than the pool's "
                            f"whole budget of {self.budget:,}")
        with self._lock:
            if name in self._paths:
                raise PoolError(f"a model named {name!r} is in the pool already")
            self._paths[name], self._sizes[name] = Path(path), size
        return size

    @property
    def names(self):
        return list(self._paths)

    @property
    def loaded(self):
        """The names of the models mapped now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    @property
    def bytes_in_use(self):
        with self._lock:
            return sum(self._sizes[n] for n in self._loaded)

    def get(self, name):
        from ambert.sw.quant.artifact import load
        with self._lock:
            if name not in self._paths:
                raise PoolError(f"no model named {name!r} in the pool (it has {', '.join(self._paths) or 'none'})")
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            need = self._sizes[name]
            while self.budget is not None and self._loaded and \
                    sum(self._sizes[n] for n in self._loaded) + need > self.budget:
                self._loaded.popitem(last=False)
                self.evictions += 1
            model = load(self._paths[name])
            self._loaded[name] = model
            self.loads += 1
            return model

    def evict(self, name):
        """Drop ``name``'s mapping now (it is mapped again when next asked for)."""
        with self._lock:
            if self._loaded.pop(name, None) is not None:
                self.evictions += 1
