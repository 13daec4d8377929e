"""ModelPool (sw/runtime/pool.py): several models under one memory budget, evicted least recently used,
mapped back on demand, never over budget, every answer the same."""

import dataclasses

import pytest
import torch

from ambert.sw.quant import artifact
from ambert.sw.runtime.pool import ModelPool, PoolError

IDS = torch.tensor([[2, 5, 7, 3, 9]])


@pytest.fixture
def two_models(tiny, tmp_path):
    """The tiny model and a variant with its first layer's FFN changed: two artifacts, their outputs."""
    qm = tiny[0]
    layer = qm.layers[0]
    variant = dataclasses.replace(qm, layers=[dataclasses.replace(layer, w1=torch.flip(layer.w1, [0]).contiguous()),
                                              *qm.layers[1:]])
    paths = [artifact.save(m, tmp_path / f"{n}.safetensors") for n, m in (("a", qm), ("b", variant))]
    return paths, [m.forward(IDS) for m in (qm, variant)]


def test_models_past_the_budget_are_evicted_and_mapped_back(two_models):
    (a, b), (want_a, want_b) = two_models
    unlimited = ModelPool()
    size = unlimited.add("a", a)
    pool = ModelPool(budget=size + size // 2)          # room for one model, not two
    pool.add("a", a)
    pool.add("b", b)
    for step, name in enumerate("ababba"):
        model = pool.get(name)
        assert torch.equal(model.forward(IDS), want_a if name == "a" else want_b), step
        assert pool.bytes_in_use <= pool.budget and pool.loaded == [name]
        del model
    assert pool.loads == 5 and pool.evictions == 4        # "bb" is one mapping


def test_an_unlimited_pool_keeps_every_model_and_the_least_recently_used_goes_first(two_models):
    (a, b), _ = two_models
    pool = ModelPool()
    pool.add("a", a)
    pool.add("b", b)
    pool.get("a"), pool.get("b"), pool.get("a")
    assert pool.loaded == ["b", "a"] and pool.evictions == 0
    pool.evict("b")
    assert pool.loaded == ["a"]


def test_bad_requests_are_refused_by_name(two_models, tmp_path):
    (a, b), _ = two_models
    pool = ModelPool(budget=1000)
    with pytest.raises(PoolError, match="needs .* bytes of weights, more than the pool's whole budget of 1,000"):
        pool.add("a", a)
    pool = ModelPool()
    pool.add("a", a)
    with pytest.raises(PoolError, match="a model named 'a' is in the pool already"):
        pool.add("a", b)
    with pytest.raises(PoolError, match="no model named 'c' in the pool"):
        pool.get("c")
    with pytest.raises(artifact.ArtifactError, match="does not exist"):
        pool.add("d", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="positive number of bytes"):
        ModelPool(budget=0)
