"""The quantizer and the integer model: shapes, batching invariance, and measured fidelity on MiniLM."""

import torch

from ambert.sw.quant.hf import encode, mean_pool
from ambert.sw.quant.ref import ref_layer


def test_tiny_model_runs_and_is_deterministic(tiny):
    qm, model, tok = tiny
    enc = encode(tok, ["the cat sat on the mat", "what is my name"])
    a = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    b = qm.forward_int(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert a.dtype == torch.int16 and a.shape == (2, enc["input_ids"].shape[1], qm.config["hidden"])
    assert torch.equal(a, b)


def _padding_invariance(qm, tok, short, long):
    alone = encode(tok, [short])
    both = encode(tok, [short, long])
    n = alone["input_ids"].shape[1]
    assert both["input_ids"].shape[1] > n
    out_alone = qm.forward_int(alone["input_ids"], alone["attention_mask"])
    out_both = qm.forward_int(both["input_ids"], both["attention_mask"])
    # real tokens get the same bits whatever the batch and padding around them
    assert torch.equal(out_alone[0], out_both[0, :n])


def test_padding_and_batching_do_not_change_bits(tiny):
    qm, _, tok = tiny
    _padding_invariance(qm, tok, "the cat", "the quick brown fox jumps over the lazy dog on the mat")


def test_minilm_padding_and_batching_do_not_change_bits(minilm):
    qm, _, tok = minilm
    _padding_invariance(qm, tok, "A short one.", "A much longer sentence that forces padding onto the "
                                                 "first one in the same batch.")


def test_minilm_artifact_shapes(minilm):
    qm, model, _ = minilm
    cfg = model.config
    assert qm.config["layers"] == cfg.num_hidden_layers == 6
    assert qm.config["hidden"] == 384 and qm.config["intermediate"] == 1536
    for p in qm.layers:
        assert p.wq.dtype == p.w1.dtype == p.w2.dtype == torch.int8
        assert p.b1.dtype == torch.int32 and p.w1.shape == (1536, 384) and p.w2.shape == (384, 1536)
        assert int(p.q_m0.min()) >= 0 and int(p.q_m0.max()) < 2 ** 31


def test_minilm_fidelity_on_fixture_sentences(minilm, eval_sentences):
    # measured, not assumed: the full benchmark (benchmarks/fidelity.py) reports the same metrics on all
    # 206 sentences; here a slice keeps the test quick
    from ambert.sw.quant.fidelity import measure
    qm, model, tok = minilm
    fid = measure(model, qm, tok, eval_sentences[:48])
    assert fid.mean_cos >= 0.995
    assert fid.min_cos >= 0.98
    assert fid.spearman >= 0.98


def test_minilm_layer_is_row_independent(minilm):
    # every op but attention works per token: running two sentences' layer-0 states together or apart
    # gives the same bits (the property the accelerator's tiling relies on)
    qm, _, tok = minilm
    enc = encode(tok, ["first sentence here", "and a second one"])
    x8, x16 = qm.embed(enc["input_ids"])
    mask = enc["attention_mask"].bool()
    together = ref_layer(x8, x16, qm.layers[0], mask)
    for i in range(2):
        apart = ref_layer(x8[i:i + 1], x16[i:i + 1], qm.layers[0], mask[i:i + 1])
        assert torch.equal(together[0][i], apart[0][0]) and torch.equal(together[1][i], apart[1][0])


def test_dequantized_output_tracks_fp32(tiny):
    qm, model, tok = tiny
    enc = encode(tok, ["the cat sat on the mat", "how do i reset my password"])
    with torch.no_grad():
        ref = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    got = mean_pool(qm.forward(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    assert float((ref * got).sum(-1).min()) > 0.9
