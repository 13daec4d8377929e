"""The CPU backend's activation arena (sw/runtime/arena.py): its liveness plan never overlaps two tensors
that are alive together, every layer it runs is `==` ref_layer (every GEMM path in row chunks, pruned layers
of different shapes, padded batches), and after its largest call it allocates no activation memory again."""

import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ambert.sw.quant import ref
from ambert.sw.runtime import arena
from ambert.sw.runtime.arena import ALIGN, ActivationArena, plan
from ambert.sw.runtime.cpu import CpuDevice
from conftest import fuzz_examples


@settings(max_examples=fuzz_examples(200))
@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 14), st.integers(0, 6)), min_size=1, max_size=25))
def test_the_plan_never_overlaps_tensors_alive_at_once(raw):
    specs = [(f"t{i}", n, frozenset(range(first, first + span + 1))) for i, (n, first, span) in enumerate(raw)]
    offsets, total = plan(specs)
    for name, n, steps in specs:
        assert offsets[name] % ALIGN == 0 and offsets[name] + n <= total
        for other, m, other_steps in specs:
            if other != name and steps & other_steps:
                assert offsets[name] + n <= offsets[other] or offsets[other] + m <= offsets[name], (name, other)


def test_tensors_alive_at_different_steps_share_bytes():
    offsets, total = plan([("a", 1000, frozenset({0, 1})), ("b", 1000, frozenset({2, 3})),
                           ("c", 64, frozenset({1, 2}))])
    assert offsets["a"] == offsets["b"] and total == 1024 + 64


def _run(qm, enc, device):
    return qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], layer_fn=lambda i, x8, x16, m:
                          device.run_layer(qm.layers[i], x8, x16, m,
                                           next_p=qm.layers[i + 1] if i + 1 < len(qm.layers) else None))


def _batch(tok, texts):
    return dict(tok(texts, padding=True, truncation=True, return_tensors="pt"))


@pytest.mark.parametrize("int8_kernel", [True, False], ids=["int8-kernel", "float32-chunks"])
def test_minilm_in_the_arena_is_the_reference(minilm, eval_sentences, int8_kernel, monkeypatch):
    if int8_kernel and not ref.cpu_int_mm_exact():
        pytest.skip("this CPU's int8 kernel is not exact: the path never runs here")
    monkeypatch.setattr(ref, "_INT_MM_OK", int8_kernel)    # the int8 kernel whether or not it is the faster here;
    # without it, as on a CPU without an exact one, FFN2's K = 1536 runs as two exact float32 chunks
    qm, _, tok = minilm
    enc = _batch(tok, eval_sentences[:5])                    # padded: the key mask matters
    # float32 GEMMs in chunks of 32 rows: several chunks and a shorter last one
    monkeypatch.setattr(arena, "GEMM_CHUNK_BYTES", 32 * 4 * qm.layers[0].w1.shape[0])
    monkeypatch.setattr(arena._LOCAL, "arena", ActivationArena(), raising=False)   # no plan at another chunk size
    r = enc["input_ids"].numel()
    assert arena.gemm_rows(r, qm.layers[0].w1.shape[0], int8_kernel) == (r if int8_kernel else 32)
    assert r > 2 * 32 and r % 32
    assert torch.equal(_run(qm, enc, CpuDevice()), qm.forward_int(enc["input_ids"], enc["attention_mask"],
                                                                  enc["token_type_ids"]))


def test_pruned_layers_of_different_shapes_in_one_arena(pruned):
    qm, _, tok = pruned
    assert len({(p.wq.shape[0], p.w1.shape[0]) for p in qm.layers}) > 1          # the layers differ
    enc = _batch(tok, ["the cat sat on the mat", "a dog"])
    assert torch.equal(_run(qm, enc, CpuDevice()), qm.forward_int(enc["input_ids"], enc["attention_mask"],
                                                                  enc["token_type_ids"]))


def test_after_the_largest_call_nothing_grows_and_results_stay_put(tiny):
    qm, _, tok = tiny
    box = {}

    def work():
        from ambert.sw.runtime.arena import thread_arena
        dev = CpuDevice()
        big = _batch(tok, ["the cat sat on the mat with the dog"] * 4)
        first = _run(qm, big, dev)
        keep = first.clone()
        arena = thread_arena()
        grown, held = arena.grows, arena.nbytes
        for texts in (["a cat"], ["the dog sat"] * 3, ["the cat sat on the mat with the dog"] * 4):
            enc = _batch(tok, texts)
            assert torch.equal(_run(qm, enc, dev), qm.forward_int(enc["input_ids"], enc["attention_mask"],
                                                                 enc["token_type_ids"]))
        box.update(grown=(grown, arena.grows), held=(held, arena.nbytes), kept=torch.equal(first, keep),
                   arena=arena)

    thread = threading.Thread(target=work)                   # a fresh thread: a fresh arena
    thread.start()
    thread.join()
    assert box["grown"][0] == box["grown"][1] and box["held"][0] == box["held"][1] > 0
    assert box["kept"]                                       # the returned output is not an arena view
    from ambert.sw.runtime.arena import thread_arena
    assert thread_arena() is not box["arena"]                # each thread has its own


def test_the_arena_counts_its_matmuls_and_steps_aside_where_it_cannot_run(tiny, monkeypatch):
    from ambert.sw.runtime import OffloadedBert
    qm, model, tok = tiny
    enc = _batch(tok, ["the cat sat"])
    off = OffloadedBert(qm, model.config, [CpuDevice()])
    off(**enc)
    assert off.last_stats.ops == {"cpu": 6 * len(qm.layers)}
    monkeypatch.setattr(ref, "FUSED", False)                 # without the fused kernels: the contract's path
    x8 = torch.zeros(1, 3, qm.config["hidden"], dtype=torch.int8)
    assert not ActivationArena.takes(x8, qm.layers[0])
    assert torch.equal(off(**enc).last_hidden_state, qm.forward(enc["input_ids"], enc["attention_mask"],
                                                                enc["token_type_ids"]))
