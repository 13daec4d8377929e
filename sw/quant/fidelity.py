"""Fidelity of the integer model to the FP32 Hugging Face model: embeddings and per-tensor SQNR."""

import math
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from .hf import encode, mean_pool
from .ref import SOFTMAX_OUT_MAX, ref_layer

__all__ = ["Fidelity", "TENSORS", "fp32_trace", "int_trace", "measure", "sqnr_db", "pairwise_spearman",
           "embedding_fidelity"]

# Every traced tensor of a layer, in dataflow order, with the scale name its integer copy is at.
TENSORS = ("q", "k", "v", "score", "probs", "ctx", "attn", "sum1", "h", "f1", "g", "f2", "sum2", "out")


def _layer_scales(qm):
    """Per layer, the scale each traced tensor's integer copy is at (per-channel ones as tensors)."""
    s = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for k, v in qm.scales.items()}
    n = qm.config["layers"]
    return [{"q": s[f"q.{i}"], "k": s[f"k.{i}"], "v": s[f"v.{i}"], "score": s[f"score.{i}"],
             "probs": 1 / SOFTMAX_OUT_MAX, "ctx": s[f"ctx.{i}"], "attn": s[f"r1.{i}"], "sum1": s[f"r1.{i}"],
             "h": s[f"r2.{i}"], "f1": s[f"f1.{i}"], "g": s[f"g.{i}"], "f2": s[f"r2.{i}"],
             "sum2": s[f"r2.{i}"], "out": s["out"] if i == n - 1 else s[f"r1.{i + 1}"]} for i in range(n)]


@torch.no_grad()
def fp32_trace(model, enc):
    """Run the FP32 model; return (last hidden state, one dict of TENSORS per layer)."""
    d_head = model.config.hidden_size // model.config.num_attention_heads
    traces = [dict() for _ in model.encoder.layer]
    hooks = []

    def keep(i, name, use_input=False):
        def hook(_m, inp, out=None):
            traces[i][name] = (inp[0] if use_input else out).detach()
        return hook

    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        hooks += [att.self.query.register_forward_hook(keep(i, "q")),
                  att.self.key.register_forward_hook(keep(i, "k")),
                  att.self.value.register_forward_hook(keep(i, "v")),
                  att.output.dense.register_forward_pre_hook(keep(i, "ctx", True)),
                  att.output.dense.register_forward_hook(keep(i, "attn")),
                  att.output.LayerNorm.register_forward_pre_hook(keep(i, "sum1", True)),
                  att.output.LayerNorm.register_forward_hook(keep(i, "h")),
                  layer.intermediate.dense.register_forward_hook(keep(i, "f1")),
                  layer.output.dense.register_forward_pre_hook(keep(i, "g", True)),
                  layer.output.dense.register_forward_hook(keep(i, "f2")),
                  layer.output.LayerNorm.register_forward_pre_hook(keep(i, "sum2", True)),
                  layer.output.LayerNorm.register_forward_hook(keep(i, "out"))]
    try:
        out = model(**enc, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    for i, tr in enumerate(traces):
        b, t, _ = tr["q"].shape
        q = tr["q"].reshape(b, t, -1, d_head).transpose(1, 2)
        k = tr["k"].reshape(b, t, -1, d_head).transpose(1, 2)
        tr["score"] = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        tr["probs"] = out.attentions[i]
    return out.last_hidden_state, traces


@torch.no_grad()
def int_trace(qm, enc):
    """Run the integer model; return (int16 last hidden state, one dict of TENSORS per layer)."""
    mask = enc["attention_mask"].to(torch.bool)
    qm.check_inputs(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    x8, x16 = qm.embed(enc["input_ids"], enc.get("token_type_ids"))
    traces = []
    for p in qm.layers:
        tr = {}
        x8, x16 = ref_layer(x8, x16, p, mask, tr)
        traces.append(tr)
    return x16, traces


def sqnr_db(ref, approx):
    """10 log10(|ref|^2 / |ref - approx|^2) in dB (inf when exact)."""
    noise = float(((ref - approx) ** 2).sum())
    signal = float((ref ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


@dataclass
class Fidelity:
    cosines: torch.Tensor           # per sentence
    spearman: float                 # of the pairwise cosine-similarity matrices (upper triangle)
    sqnr: list                      # per layer: {tensor name: dB}
    int_embeddings: torch.Tensor
    fp32_embeddings: torch.Tensor

    @property
    def mean_cos(self):
        return float(self.cosines.mean())

    @property
    def min_cos(self):
        return float(self.cosines.min())


def _masked(name, t, mask):
    if name in ("score", "probs"):
        m = mask[:, None, :, None] & mask[:, None, None, :]
        return t[m.expand(t.shape)]
    return t[mask]


@torch.no_grad()
def measure(model, qm, tokenizer, sentences, batch_size=32, progress=None):
    """Compare ``qm`` with FP32 ``model`` on ``sentences``; return a :class:`Fidelity`."""
    ref_emb, int_emb = [], []
    n_layers = qm.config["layers"]
    sig = [{n: 0.0 for n in TENSORS} for _ in range(n_layers)]
    err = [{n: 0.0 for n in TENSORS} for _ in range(n_layers)]
    batches = [sentences[i:i + batch_size] for i in range(0, len(sentences), batch_size)]
    scales = _layer_scales(qm)
    for batch in (progress(batches) if progress else batches):
        enc = encode(tokenizer, batch, max_length=qm.config["max_positions"])
        mask = enc["attention_mask"].to(torch.bool)
        fp_last, fp_tr = fp32_trace(model, enc)
        q_last, q_tr = int_trace(qm, enc)
        ref_emb.append(mean_pool(fp_last, enc["attention_mask"]))
        int_emb.append(mean_pool(q_last.to(torch.float32) * qm.out_scale, enc["attention_mask"]))
        for i in range(n_layers):
            for n in TENSORS:
                r = _masked(n, fp_tr[i][n].double(), mask)
                a = _masked(n, q_tr[i][n].double() * scales[i][n], mask)
                sig[i][n] += float((r ** 2).sum())
                err[i][n] += float(((r - a) ** 2).sum())
    ref_emb, int_emb = torch.cat(ref_emb), torch.cat(int_emb)
    cos = (ref_emb * int_emb).sum(dim=-1)
    rho = pairwise_spearman(ref_emb, int_emb)
    sqnr = [{n: (math.inf if err[i][n] == 0 else 10 * math.log10(max(sig[i][n], 1e-30) / err[i][n]))
             for n in TENSORS} for i in range(n_layers)]
    return Fidelity(cosines=cos, spearman=rho, sqnr=sqnr, int_embeddings=int_emb, fp32_embeddings=ref_emb)


def pairwise_spearman(ref_emb, emb):
    """Spearman's rank correlation of the pairwise cosine similarities of two sets of unit embeddings."""
    n = len(ref_emb)
    if n < 3:
        return math.nan
    iu = torch.triu_indices(n, n, offset=1)
    return float(spearmanr((ref_emb @ ref_emb.T)[iu[0], iu[1]].numpy(), (emb @ emb.T)[iu[0], iu[1]].numpy()).statistic)


@torch.no_grad()
def embedding_fidelity(teacher, embed, tokenizer, sentences, batch_size=32):
    """``(cosines, spearman)`` of the sentence embeddings ``embed(enc)`` (a float last hidden state) against
    the FP32 ``teacher``'s: per-sentence cosine of the mean-pooled embeddings and the pairwise-similarity
    Spearman. Unlike :func:`measure` it needs no layer-by-layer match, so a pruned student compares with
    its dense teacher."""
    ref, got = [], []
    for i in range(0, len(sentences), batch_size):
        enc = encode(tokenizer, sentences[i:i + batch_size])
        ref.append(mean_pool(teacher(**enc).last_hidden_state, enc["attention_mask"]))
        got.append(mean_pool(embed(enc), enc["attention_mask"]))
    ref, got = torch.cat(ref), torch.cat(got)
    return (ref * got).sum(-1), pairwise_spearman(ref, got)

