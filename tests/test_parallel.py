"""Data, tensor and pipeline parallelism (sw/parallel.py) over torch.distributed: every mode `==` the
single-device integer reference (2 ranks of the tiny model on cpu and sim, 3 of a pruned one, 4 of a
bert-base-shaped one), a device lost on one rank falls back, and a rank that dies fails the run by name,
in bounded time."""

from pathlib import Path

import pytest
import torch

from ambert.sw.parallel import ParallelError, launch, shard_layer
from ambert.sw.quant import artifact
from ambert.sw.quant.hf import encode
from conftest import WORDS

SENTENCES = [" ".join(WORDS[i:i + 3 + i % 5]) for i in range(0, 50, 5)]


@pytest.fixture(scope="module")
def tiny_artifact_path(tiny, tmp_path_factory):
    return artifact.save(tiny[0], tmp_path_factory.mktemp("parallel") / "tiny.safetensors")


@pytest.mark.parametrize("mode", ["data", "tensor", "pipeline"])
@pytest.mark.parametrize("device", ["cpu", "sim"])
def test_two_ranks_equal_the_reference(tiny, tiny_artifact_path, mode, device):
    qm, _, tok = tiny
    enc = encode(tok, SENTENCES[:5])          # 5 sentences: the data split is uneven (3 + 2)
    want = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    result = launch(mode, tiny_artifact_path, dict(enc), ranks=2, device=device)
    assert torch.equal(result.out, want)
    assert set(result.ops) == {device}
    if device == "sim":
        assert all(c > 0 for c in result.cycles)                  # each rank's device counted its cycles


def test_heads_and_neurons_that_do_not_divide_split_one_apart(tiny):
    p = tiny[0].layers[0]                               # 4 heads, 64 neurons over 3 ranks: 2/1/1, 22/21/21
    shards = [shard_layer(p, r, 3) for r in range(3)]
    assert [s.attn.heads for s in shards] == [2, 1, 1] and [s.w1.shape[0] for s in shards] == [22, 21, 21]
    assert torch.equal(torch.cat([s.attn.wq for s in shards]), p.wq)
    assert torch.equal(torch.cat([s.w2 for s in shards], dim=1), p.w2)
    assert shard_layer(p, 4, 5).attn is None              # a fifth rank of four heads has none


def test_a_pruned_model_splits_over_ranks_that_do_not_divide_it(pruned, tmp_path):
    """The pruned tiny model (layers of 1 to 4 heads, FFNs of different widths): tensor parallel over 3
    ranks, pipeline over 2 (stages of different shapes), `==` the single-device reference."""
    from ambert.sw.quant import artifact
    qm, _, tok = pruned
    path = artifact.save(qm, tmp_path / "pruned.safetensors")
    enc = encode(tok, SENTENCES[:3])
    want = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert torch.equal(launch("tensor", path, dict(enc), ranks=3).out, want)
    assert torch.equal(launch("pipeline", path, dict(enc), ranks=2, micro_batches=2).out, want)


def test_a_rank_that_fails_fails_the_run_by_name(tiny, tiny_artifact_path):
    enc = encode(tiny[2], SENTENCES[:2])
    with pytest.raises(ParallelError, match="rank [01] failed: .*no board on /nowhere"):
        launch("data", tiny_artifact_path, dict(enc), ranks=2, device="board:/nowhere", timeout_s=30)


@pytest.mark.parametrize("mode", ["data", "tensor", "pipeline"])
def test_a_rank_that_dies_fails_the_run_by_name_in_bounded_time(tiny, tiny_artifact_path, mode, monkeypatch):
    """Rank 1 killed (SIGKILL) as it starts its second layer (pipeline: its stage's): the run ends with a ParallelError naming it
    well within the group's timeout, not a hang."""
    import time
    monkeypatch.setenv("AMBERT_RANK_FAULT", "1:1")
    enc = encode(tiny[2], SENTENCES[:4])
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match=r"rank 1 died \(exit code -9\)"):
        launch(mode, tiny_artifact_path, dict(enc), ranks=2, timeout_s=60)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("mode", ["data", "tensor", "pipeline"])
def test_a_device_lost_on_one_rank_falls_back_and_the_run_completes(tiny, tiny_artifact_path, mode, monkeypatch):
    """Rank 1's simulated device fails every operation from its second layer on: its work falls back on
    the CPU behind it, and the gathered result is still `==` the single-device reference."""
    monkeypatch.setenv("AMBERT_RANK_FAULT", "1:1:device")
    qm, _, tok = tiny
    enc = encode(tok, SENTENCES[:4])
    want = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    result = launch(mode, tiny_artifact_path, dict(enc), ranks=2, device="sim", timeout_s=60)
    assert torch.equal(result.out, want)
    assert result.ops.get("sim", 0) > 0 and result.ops.get("cpu", 0) > 0


def test_the_command_line_runs_in_parallel_and_refuses_what_cannot_split(tiny_artifact_path, tiny_bert_dir, capsys):
    from ambert.sw.cli import main
    base = ["run", "--artifact", str(tiny_artifact_path), "--model", tiny_bert_dir, "--device", "cpu"]
    assert main([*base, "the cat sat", "the dog sat"]) == 0
    single = capsys.readouterr().out.split("cosine similarity")[1]
    assert main([*base, "--parallel", "tensor", "--ranks", "2", "the cat sat", "the dog sat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tensor parallel over 2 ranks of cpu") and out.split("cosine similarity")[1] == single
    assert main([*base, "--parallel", "pipeline", "--ranks", "2", "--micro-batches", "0", "the cat"]) == 2
    assert "--micro-batches must be at least 1, not 0" in capsys.readouterr().err


def test_pipeline_stages_given_or_balanced(tiny, tiny_artifact_path):
    from ambert.sw.parallel import stage_bounds
    assert stage_bounds(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)] and stage_bounds(6, 4)[0] == (0, 2)
    assert stage_bounds(6, 2, [4, 2]) == [(0, 4), (4, 6)]
    with pytest.raises(ValueError, match=r"stages \[1, 2\] must give each of the 2 ranks"):
        stage_bounds(6, 2, [1, 2])
    qm, _, tok = tiny
    enc = encode(tok, SENTENCES[:7])
    want = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    result = launch("pipeline", tiny_artifact_path, dict(enc), ranks=2, micro_batches=3, stages=[1, 1])
    assert torch.equal(result.out, want) and [len(m) for m in result.micro_cycles] == [3, 3]


@pytest.fixture(scope="module")
def bert_base_shaped(tmp_path_factory):
    """A random model of bert-base's layer shape (hidden 768, 12 heads of 64, FFN 3072), four layers, quantized
    with a one-point search grid (the shapes are what this checks, not the calibration)."""
    from conftest import make_tiny_bert
    from ambert.sw.quant.quantize import QuantConfig, quantize_pretrained
    folder = make_tiny_bert(str(tmp_path_factory.mktemp("bert_base")), hidden=768, heads=12, layers=4, ffn=3072,
                            positions=64)
    qm, _, tok = quantize_pretrained(folder, [" ".join(WORDS[i:i + 9]) for i in range(0, 30, 5)],
                                     QuantConfig(alphas=(0.5,), clips=(1.0,)), progress=False)
    return qm, tok, artifact.save(qm, Path(folder) / "q.safetensors")


@pytest.mark.parametrize("mode", ["data", "tensor", "pipeline"])
def test_four_ranks_of_a_bert_base_shaped_model_equal_the_reference(bert_base_shaped, mode):
    qm, tok, path = bert_base_shaped
    enc = encode(tok, SENTENCES[:5])
    want = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    result = launch(mode, path, dict(enc), ranks=4, micro_batches=3)
    assert torch.equal(result.out, want) and set(result.ops) == {"cpu"}
