"""Structured pruning: heads and FFN neurons physically removed, the pruned model `==` its integer
reference on every backend, the artifact and the command line describing it, bad requests refused."""

import dataclasses

import pytest
import torch

from ambert.sw.cli import main
from ambert.sw.quant import artifact as art
from ambert.sw.quant.hf import encode, load_bert
from ambert.sw.quant.model import encoder_macs, layer_dims, layer_macs
from ambert.sw.quant.prune import PrunePlan, apply_plan, choose_plan, importance, prune_pretrained
from ambert.sw.quant.quantize import tokenize_calibration
from ambert.sw.runtime import OffloadedBert, offload
from ambert.sw.runtime.cpu import CpuDevice
from ambert.sw.runtime.sim import SimDevice
from conftest import CALIB
from test_runtime import SMALL

SENTENCES = ["the cat sat on the mat", "what is my name", "quick brown fox jumps over the lazy dog"]


def test_pruned_units_are_removed_not_zeroed(pruned, tiny_bert_dir):
    qm, model, _ = pruned
    dense = load_bert(tiny_bert_dir)
    dims = layer_dims(qm.config)
    assert dims != [(4, 64)] * 2 and all(1 <= h <= 4 and 4 <= f <= 64 and f % 4 == 0 for h, f in dims)
    for p, layer, (h, f) in zip(qm.layers, model.encoder.layer, dims):
        assert p.heads == h and p.wq.shape == p.wk.shape == p.wv.shape == (8 * h, 32) and p.wo.shape == (32, 8 * h)
        assert p.w1.shape == (f, 32) and p.w2.shape == (32, f)
        assert layer.attention.self.query.weight.shape == (8 * h, 32) and layer.output.dense.weight.shape == (32, f)
    pr = qm.source["pruning"]
    assert pr["macs_left"] == encoder_macs(qm.config) <= 0.55 * pr["dense_macs"]
    assert pr["dense_macs"] == encoder_macs(dict(qm.config, layer_heads=[4, 4], layer_intermediate=[64, 64]))
    # the kept units are the dense model's own rows and columns
    plan = PrunePlan.from_json(pr["plan"])
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in plan.heads[0]])
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight,
                       dense.encoder.layer[0].attention.self.query.weight[rows])
    assert torch.equal(model.encoder.layer[1].output.dense.weight,
                       dense.encoder.layer[1].output.dense.weight[:, list(plan.neurons[1])])
    weight_bytes = sum(t.numel() for p in qm.layers for t in (p.wq, p.wk, p.wv, p.wo, p.w1, p.w2))
    assert weight_bytes <= 0.6 * 2 * (4 * 32 * 32 + 2 * 32 * 64)


def test_the_pruned_model_is_bit_exact_on_sim_and_cpu(pruned):
    qm, model, tok = pruned
    enc = encode(tok, SENTENCES)
    ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    sim = OffloadedBert(qm, model.config, [SimDevice(SMALL), CpuDevice()])
    assert torch.equal(sim(**enc).last_hidden_state, ref)
    assert sim.last_stats.ops == {"sim": 6 * 2}          # every GEMM of both (different) layers on the device
    cpu = offload(model, device="cpu", quantized=qm)
    assert torch.equal(cpu(**enc).last_hidden_state, ref)


@pytest.mark.cuda
def test_the_pruned_model_is_bit_exact_on_the_gpu(pruned):
    qm, model, tok = pruned
    enc = encode(tok, SENTENCES)
    ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    gpu = offload(model, device="gpu", quantized=qm)
    assert torch.equal(gpu(**enc).last_hidden_state.cpu(), ref)
    assert set(gpu.last_stats.ops) == {"gpu"}


def test_the_pruned_artifact_round_trips_and_is_checked(pruned, tmp_path):
    qm, _, tok = pruned
    path = art.save(qm, tmp_path / "pruned.safetensors")
    back = art.load(path)
    assert layer_dims(back.config) == layer_dims(qm.config)
    enc = encode(tok, SENTENCES)
    assert torch.equal(back.forward_int(enc["input_ids"], enc["attention_mask"]),
                       qm.forward_int(enc["input_ids"], enc["attention_mask"]))
    heads = list(qm.config["layer_heads"])
    heads[0] = 4 if heads[0] != 4 else 3
    wrong = dataclasses.replace(qm, config=dict(qm.config, layer_heads=heads))
    with pytest.raises(art.ArtifactError, match="layers.0.wq has shape"):
        art.load(art.save(wrong, tmp_path / "wrong.safetensors"))


def test_importance_ranks_a_dead_head_and_dead_neurons_last(tiny_bert_dir, tiny):
    """A head whose output projection is zero and neurons whose FFN2 columns are zero change nothing: their
    score is exactly 0 and they are the first to go."""
    _, _, tok = tiny
    model = load_bert(tiny_bert_dir)
    with torch.no_grad():
        model.encoder.layer[1].attention.output.dense.weight[:, 16:24] = 0         # head 2 of layer 1
        model.encoder.layer[0].output.dense.weight[:, [3, 9, 17, 40]] = 0
    batches, _ = tokenize_calibration(tok, model, CALIB)
    heads, neurons = importance(model, batches, progress=False)
    assert float(heads[1][2]) == 0 and all(float(s) > 0 for s in heads[1][[0, 1, 3]])
    assert all(float(neurons[0][j]) == 0 for j in (3, 9, 17, 40)) and float(neurons[0].count_nonzero()) == 60
    c, d = 32, 8
    plan = choose_plan(model, heads, neurons, layer_macs(c, d, 1, 0, 128), granularity=("heads",))
    assert plan.heads[1] == (0, 1, 3) and plan.heads[0] == (0, 1, 2, 3)
    plan = choose_plan(model, heads, neurons, layer_macs(c, d, 0, 4, 128), granularity=("neurons",), lanes=4)
    assert set(range(64)) - set(plan.neurons[0]) == {3, 9, 17, 40} and plan.neurons[1] == tuple(range(64))
    # a layer at its floor gives nothing: the dead head stays, the least important head of layer 0 goes
    whole = layer_macs(c, d, 4, 64, 128)
    plan = choose_plan(model, heads, neurons, layer_macs(c, d, 1, 0, 128), granularity=("heads",),
                       floors=[0, whole - 1])
    assert plan.heads[1] == (0, 1, 2, 3) and len(plan.heads[0]) == 3
    assert set(range(4)) - set(plan.heads[0]) == {int(heads[0].argmin())}
    with pytest.raises(ValueError, match="its floor of MACs"):
        choose_plan(model, heads, neurons, whole // 2, floors=[0.9 * whole] * 2)


def test_bad_pruning_requests_are_refused(tiny_bert_dir):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), not 1.0"):
        prune_pretrained(1.0, model_dir=tiny_bert_dir, calibration=CALIB, progress=False)
    with pytest.raises(ValueError, match="unknown pruning granularity bricks"):
        prune_pretrained(0.2, ("bricks",), model_dir=tiny_bert_dir, calibration=CALIB, progress=False)
    with pytest.raises(ValueError, match="tiles' share .* must be in \\[0, 1\\], not 1.5"):
        prune_pretrained(0.2, ("neurons", "tiles"), model_dir=tiny_bert_dir, calibration=CALIB, progress=False,
                         tile_share=1.5)
    with pytest.raises(ValueError, match="weight tiles cannot remove"):
        prune_pretrained(0.99, ("tiles",), model_dir=tiny_bert_dir, calibration=CALIB, lanes=4, progress=False)
    with pytest.raises(ValueError, match="pruning heads cannot remove 90.0%"):
        prune_pretrained(0.9, ("heads",), model_dir=tiny_bert_dir, calibration=CALIB, progress=False)
    with pytest.raises(ValueError, match=r"layer floor .* must be in \[0, 1\), not 1.0"):
        prune_pretrained(0.4, model_dir=tiny_bert_dir, calibration=CALIB, progress=False, floor=1.0)
    model = load_bert(tiny_bert_dir)
    with pytest.raises(ValueError, match="does not fit layer 1"):
        apply_plan(model, PrunePlan(((0, 1), (0, 7)), (tuple(range(8)), tuple(range(8)))))
    with pytest.raises(ValueError, match="3 layers, the model 2"):
        apply_plan(model, PrunePlan(((0,),) * 3, ((0,),) * 3))


def _zero_tile_count(w, lanes):
    n, k = w.shape
    t = w.reshape(n // lanes, lanes, k // lanes, lanes)
    return (t == 0).all(dim=3).all(dim=1)


def test_zeroed_weight_tiles_stay_zero_in_the_artifact_and_the_device_skips_them(tiny_bert_dir):
    """Heads, neurons and tiles at once: the tiles zeroed in FP32 are zero in the int8 weights, every n-tile
    keeps a non-zero tile, the MACs left count them; the device `==` the reference on sim and cpu, in
    fewer cycles than the same shapes with those tiles computed."""
    qm, model, tok = prune_pretrained(0.4, ("heads", "neurons", "tiles"), model_dir=tiny_bert_dir,
                                      calibration=CALIB, lanes=4, progress=False)
    pr = qm.source["pruning"]
    assert pr["tiles_zeroed"] > 0 and pr["macs_left"] == encoder_macs(qm.config) - pr["tile_macs_removed"]
    assert pr["macs_left"] <= 0.6 * pr["dense_macs"] < encoder_macs(qm.config)
    zero = 0
    for p, layer in zip(qm.layers, model.encoder.layer):
        for q, lin in ((p.wq, layer.attention.self.query), (p.w1, layer.intermediate.dense),
                       (p.w2, layer.output.dense), (p.wo, layer.attention.output.dense)):
            fp_zero = _zero_tile_count(lin.weight, 4)
            assert torch.equal(_zero_tile_count(q, 4) | fp_zero, _zero_tile_count(q, 4))   # zero stays zero
            assert not fp_zero.all(dim=1).any()                 # every n-tile keeps a tile
            zero += int(fp_zero.sum())
    assert zero > 0
    enc = encode(tok, SENTENCES)
    ref = qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    sim = OffloadedBert(qm, model.config, [SimDevice(SMALL), CpuDevice()])
    assert torch.equal(sim(**enc).last_hidden_state, ref)
    assert torch.equal(offload(model, device="cpu", quantized=qm)(**enc).last_hidden_state, ref)
    # the same model with every zero weight made 1: the same shapes, no zero tile left
    filled = dataclasses.replace(qm, layers=[dataclasses.replace(
        p, **{n: torch.where(getattr(p, n) == 0, 1, getattr(p, n)).to(torch.int8)
              for n in ("wq", "wk", "wv", "wo", "w1", "w2")}) for p in qm.layers])
    dense = OffloadedBert(filled, model.config, [SimDevice(SMALL), CpuDevice()])
    dense_ref = filled.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert torch.equal(dense(**enc).last_hidden_state, dense_ref)
    assert sim.last_stats.cycles < dense.last_stats.cycles


def test_prune_info_run_on_the_command_line(tiny_bert_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    out = tmp_path / "p.safetensors"
    assert main(["prune", "--fraction", "0.3", "--model", tiny_bert_dir, "--calibration", str(calib),
                 "--lanes", "4", "--layer-floor", "0.5", "-o", str(out), "-q"]) == 0
    assert ("pruned  30% of encoder MACs asked (heads, neurons, each layer keeping 35% of its MACs at least)"
            in capsys.readouterr().out)
    assert main(["prune", "--fraction", "0.3", "--layer-floor", "1.5", "--model", tiny_bert_dir, "--calibration",
                 str(calib), "-o", str(out), "-q"]) == 2
    assert "must be in [0, 1), not 1.5" in capsys.readouterr().err
    tiles = tmp_path / "t.safetensors"
    assert main(["prune", "--fraction", "0.2", "--granularity", "tiles", "--model", tiny_bert_dir, "--calibration",
                 str(calib), "--lanes", "4", "-o", str(tiles), "-q"]) == 0
    assert "weight tiles of 4x4 zeroed" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "heads per layer" in text and "MACs left" in text
    assert main(["run", "--artifact", str(out), "--model", tiny_bert_dir, "--device", "cpu", "the cat sat"]) == 0
    with pytest.raises(SystemExit):
        main(["prune", "--fraction", "1.5"])
    assert "outside [0, 1)" in capsys.readouterr().err
