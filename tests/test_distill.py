"""Distillation: the training text is real and disjoint from calibration and evaluation, a short run on a
pruned tiny model writes an artifact the backends run `==` its reference, an interrupted run resumes to the
same weights, and checkpoints of another model are refused."""

from pathlib import Path

import pytest
import torch

from ambert.sw.cli import main
from ambert.sw.quant import artifact as art
from ambert.sw.quant.distill import (CheckpointError, DistillConfig, distill, distill_artifact,
                                     training_sentences)
from ambert.sw.quant.hf import encode, load_bert, load_tokenizer
from ambert.sw.quant.model import layer_dims
from ambert.sw.quant.prune import PrunePlan, apply_plan
from ambert.sw.quant.quantize import CALIBRATION_SENTENCES, read_sentences
from ambert.sw.runtime import OffloadedBert
from ambert.sw.runtime.cpu import CpuDevice
from ambert.sw.runtime.sim import SimDevice
from conftest import CALIB
from test_runtime import SMALL

EVALUATION = Path(__file__).parent / "fixtures" / "sentences.txt"
RECIPE = DistillConfig(steps=6, batch=4, lr=1e-3, warmup=2, checkpoint_every=3)


def test_the_training_text_is_real_and_disjoint():
    sentences = training_sentences()
    assert len(sentences) > 2000 and len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() or s[0] in "\"'0123456789" for s in sentences[:200])
    held_out = set(read_sentences(CALIBRATION_SENTENCES)) | set(read_sentences(EVALUATION))
    assert not held_out & set(sentences)
    assert sentences[0] not in training_sentences(exclude=[sentences[0]])


@pytest.fixture(scope="module")
def pruned_path(pruned, tmp_path_factory):
    return art.save(pruned[0], tmp_path_factory.mktemp("distill") / "pruned.ambert.safetensors")


def test_a_short_distillation_writes_a_pruned_artifact_that_runs_bit_exact(pruned, pruned_path, tiny_bert_dir,
                                                                            tmp_path):
    qm, model, tok = distill_artifact(pruned_path, tiny_bert_dir, RECIPE, tmp_path / "ckpt", CALIB,
                                      progress=False)
    before = pruned[0]
    assert layer_dims(qm.config) == layer_dims(before.config)
    assert qm.source["pruning"] == before.source["pruning"]
    ds = qm.source["distillation"]
    assert ds["steps"] == 6 and ds["sentences"] > 2000 and ds["quantization_aware"]
    assert not torch.equal(qm.layers[0].w1, before.layers[0].w1)         # it learned something
    enc = encode(tok, ["the cat sat on the mat", "what is my name"])
    ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    sim = OffloadedBert(qm, model.config, [SimDevice(SMALL), CpuDevice()])
    assert torch.equal(sim(**enc).last_hidden_state, ref) and sim.last_stats.ops == {"sim": 12}


def test_distilling_a_tile_pruned_artifact_keeps_its_zero_tiles(tiny_bert_dir, tmp_path):
    """The student learns every weight but the pruned tiles: the distilled artifact's zero tiles are the
    pruned one's, and it runs `==` its reference on the simulated device."""
    from ambert.sw.quant.prune import prune_pretrained
    pruned, _, _ = prune_pretrained(0.2, ("tiles",), model_dir=tiny_bert_dir, calibration=CALIB, lanes=4,
                                    progress=False)
    path = art.save(pruned, tmp_path / "tiles.ambert.safetensors")
    qm, model, tok = distill_artifact(path, tiny_bert_dir, RECIPE, None, CALIB, progress=False)

    def zero_tiles(w):
        return (w.reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4) == 0).all(dim=3).all(dim=1)
    for before, after in zip(pruned.layers, qm.layers):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            assert torch.equal(zero_tiles(getattr(before, name)) & ~zero_tiles(getattr(after, name)),
                               torch.zeros_like(zero_tiles(getattr(before, name)))), name
    assert sum(int(zero_tiles(p.w1).sum()) for p in qm.layers) > 0
    assert not torch.equal(qm.layers[0].w1, pruned.layers[0].w1)
    enc = encode(tok, ["the cat sat on the mat"])
    ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    sim = OffloadedBert(qm, model.config, [SimDevice(SMALL), CpuDevice()])
    assert torch.equal(sim(**enc).last_hidden_state, ref)


class Interrupting(torch.nn.Module):
    """The teacher, until its ``at``-th call, where a Ctrl-C arrives."""

    def __init__(self, teacher, at):
        super().__init__()
        self.teacher, self.at, self.calls = teacher, at, 0
        self.config = teacher.config

    def forward(self, **enc):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.teacher(**enc)


def _student(tiny_bert_dir, plan):
    return apply_plan(load_bert(tiny_bert_dir), plan)


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(pruned, tiny_bert_dir, tmp_path):
    plan = PrunePlan.from_json(pruned[0].source["pruning"]["plan"])
    teacher, tok = load_bert(tiny_bert_dir), load_tokenizer(tiny_bert_dir)
    sentences = training_sentences()[:64]
    whole = _student(tiny_bert_dir, plan)
    distill(teacher, whole, tok, sentences, RECIPE, tmp_path / "a", dict(plan=plan.to_json()), progress=False)
    cut = _student(tiny_bert_dir, plan)
    with pytest.raises(KeyboardInterrupt):                # at step 5: the checkpoint holds step 3
        distill(Interrupting(teacher, 5), cut, tok, sentences, RECIPE, tmp_path / "b", dict(plan=plan.to_json()),
                progress=False)
    resumed = _student(tiny_bert_dir, plan)
    run = distill(teacher, resumed, tok, sentences, RECIPE, tmp_path / "b", dict(plan=plan.to_json()),
                  progress=False)
    assert run["resumed_from"] == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a checkpoint of another plan, and a damaged one, are refused by name
    other = PrunePlan(plan.heads, tuple(n[:-4] if i == 0 else n for i, n in enumerate(plan.neurons)))
    with pytest.raises(CheckpointError, match="belongs to another run: its plan differs"):
        distill(teacher, _student(tiny_bert_dir, other), tok, sentences, RECIPE, tmp_path / "b",
                dict(plan=other.to_json()), progress=False)
    (tmp_path / "c").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        distill(teacher, _student(tiny_bert_dir, plan), tok, sentences, RECIPE, tmp_path / "c",
                dict(plan=plan.to_json()), progress=False)


def test_distill_on_the_command_line_and_its_refusals(pruned_path, tiny_bert_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    out = tmp_path / "d.ambert.safetensors"
    assert main(["distill", str(pruned_path), "--model", tiny_bert_dir, "--steps", "2", "--batch", "4",
                 "--calibration", str(calib), "-o", str(out), "-q"]) == 0
    assert "2 steps on" in capsys.readouterr().out and not Path(f"{out}.ckpt").exists()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "distill 2 steps" in text and "heads per layer" in text
    other = tmp_path / "other"
    from conftest import make_tiny_bert
    make_tiny_bert(str(other), seed=1)
    assert main(["distill", str(pruned_path), "--model", str(other), "--steps", "2", "-q"]) == 2
    assert "was made from other weights" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "missing.safetensors"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
