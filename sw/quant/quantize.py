"""Post-training quantization of a Hugging Face BERT into a :class:`QuantizedBert`.

Static activation scales come from a calibration pass over sentences; weights are int8 per output
channel. Every int8 GEMM input X is produced by a per-channel requantization (a LayerNorm output gain,
the P.V requant, the GELU requant), so SmoothQuant's migration ``X_j / s_j``, ``W[:, j] * s_j`` costs
nothing at run time; ``s_j = max|X_j|**alpha / max|W_j|**(1-alpha)`` and the clipping of the int8 range
are chosen per GEMM input to minimise the GEMM output error on the calibration activations. The int16
residual copies are never smoothed. See docs/integer-contract.md for every constant below.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .fixedpoint import gelu_params, layernorm_params, multiplier, multipliers, softmax_params
from .model import QuantizedBert
from .ref import INT16_MAX, INT32_MAX, LayerParams, SOFTMAX_OUT_MAX

__all__ = ["QuantConfig", "calibrate", "quantize", "quantize_pretrained", "read_sentences", "tokenize_calibration",
           "source_of",
           "CALIBRATION_SENTENCES"]


@dataclass(frozen=True)
class QuantConfig:
    """Calibration choices. ``percentile`` clips int8 activation ranges (1.0 = max over the set)."""
    # For each int8 GEMM input, the SmoothQuant strength alpha and the clipping ratio of the int8 range
    # are chosen from these grids to minimise the GEMM output error on the calibration activations.
    alphas: tuple = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8)
    clips: tuple = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)
    percentile: float = 1.0         # quantile of |x| used for the per-tensor int8 Q and K
    headroom16: float = 1.25        # int16 tensors get this much room above the calibration max


class _Stats:
    """Running per-tensor maxima (and per-channel maxima / quantiles where asked) of named tensors."""

    def __init__(self, percentile):
        self.percentile = percentile
        self.max = {}
        self.chan = {}
        self.quant = {}
        self.samples = {}

    def add(self, name, x, per_channel=False, keep=False):
        x = x.detach().float().reshape(-1, x.shape[-1])
        if keep:
            self.samples.setdefault(name, []).append(x)
        x = x.abs()
        self.max[name] = max(self.max.get(name, 0.0), float(x.max()))
        if per_channel:
            c = x.amax(dim=0)
            self.chan[name] = c if name not in self.chan else torch.maximum(self.chan[name], c)
        if self.percentile < 1.0:
            flat = x.reshape(-1)
            if flat.numel() > 1 << 24:
                flat = flat[torch.randperm(flat.numel())[: 1 << 24]]
            q = float(torch.quantile(flat, self.percentile))
            self.quant[name] = max(self.quant.get(name, 0.0), q)

    def int8_range(self, name):
        return self.quant.get(name, self.max[name]) if self.percentile < 1.0 else self.max[name]


@torch.no_grad()
def calibrate(model, token_batches, percentile=1.0, progress=True):
    """Run the FP32 model over tokenized sentences (one per batch: no padding) and collect ranges."""
    stats = _Stats(percentile)
    hooks = []
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads      # a pruned layer has fewer heads, not narrower ones

    def out_hook(name, per_channel=False, keep=False):
        def hook(_m, _inp, out):
            stats.add(name, out, per_channel, keep)
        return hook

    def in_hook(name, per_channel=False, keep=False):
        def hook(_m, inp):
            stats.add(name, inp[0], per_channel, keep)
        return hook

    emb = model.embeddings
    hooks.append(emb.LayerNorm.register_forward_pre_hook(in_hook("emb.sum")))
    hooks.append(emb.LayerNorm.register_forward_hook(out_hook("x.0", per_channel=True, keep=True)))
    captured = {}
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        for n in ("query", "key", "value"):
            def qkv_hook(_m, _inp, out, i=i, n=n):
                stats.add(f"{n[0]}.{i}", out, per_channel=n == "value")
                captured[n] = out
                if n == "value":
                    b, t, _ = captured["query"].shape
                    q = captured["query"].reshape(b, t, -1, d_head).transpose(1, 2)
                    k = captured["key"].reshape(b, t, -1, d_head).transpose(1, 2)
                    stats.add(f"score.{i}", q @ k.transpose(-1, -2) / math.sqrt(d_head))
            hooks.append(getattr(att.self, n).register_forward_hook(qkv_hook))
        hooks.append(att.output.dense.register_forward_pre_hook(in_hook(f"ctx.{i}", per_channel=True, keep=True)))
        hooks.append(att.output.dense.register_forward_hook(out_hook(f"attn.{i}")))
        hooks.append(att.output.LayerNorm.register_forward_pre_hook(in_hook(f"sum1.{i}")))
        hooks.append(att.output.LayerNorm.register_forward_hook(out_hook(f"h.{i}", per_channel=True, keep=True)))
        hooks.append(layer.intermediate.dense.register_forward_hook(out_hook(f"f1.{i}")))
        hooks.append(layer.output.dense.register_forward_pre_hook(in_hook(f"g.{i}", per_channel=True, keep=True)))
        hooks.append(layer.output.dense.register_forward_hook(out_hook(f"f2.{i}")))
        hooks.append(layer.output.LayerNorm.register_forward_pre_hook(in_hook(f"sum2.{i}")))
        hooks.append(layer.output.LayerNorm.register_forward_hook(out_hook(f"x.{i + 1}", per_channel=True, keep=True)))
    try:
        for enc in tqdm(token_batches, desc="calibrating", unit="sent", disable=not progress):
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _quant_weight(w, in_smooth=None):
    """int8 symmetric per output channel; returns (int8 [N, K], float64 scales [N])."""
    w = w.detach().double()
    if in_smooth is not None:
        w = w * in_smooth[None, :]
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _quant_bias(b, acc_scale, k):
    # The bias initialises the int32 accumulator: leave room for K products of -128 * -128.
    limit = INT32_MAX - k * (1 << 14)
    q = torch.round(b.detach().double() / acc_scale).clamp(-limit, limit)
    return q.to(torch.int32)


def _fake_quant_weight(w):
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-127, 127) * scale


def _search_input(x, weights, qc):
    """Choose per-channel smoothing factors and the int8 scale for GEMM input samples ``x`` [N, K].

    Returns ``(smooth [K], scale)``: the int8 copy is ``x_j / (smooth_j * scale)`` and each weight
    column j is multiplied by ``smooth_j`` before its per-row quantization. The pair minimises
    ``sum |x W^T - q(x) q(W)^T|^2`` over the alpha and clip grids of ``qc``.
    """
    x = x.double()
    ws = [w.detach().double() for w in weights]
    refs = [x @ w.T for w in ws]
    a_max = x.abs().amax(dim=0).clamp(min=1e-5)
    w_max = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0).clamp(min=1e-5)
    best = None
    for alpha in qc.alphas:
        smooth = a_max ** alpha / w_max ** (1 - alpha) if alpha else torch.ones_like(a_max)
        xs = x / smooth
        wqs = [_fake_quant_weight(w * smooth) for w in ws]
        top = float(xs.abs().max())
        for clip in qc.clips:
            scale = max(top * clip, 1e-8) / 127
            xq = torch.round(xs / scale).clamp(-128, 127) * scale
            err = sum(float(((xq @ wq.T - r) ** 2).sum()) for wq, r in zip(wqs, refs))
            if best is None or err < best[0]:
                best = (err, smooth, scale)
    return best[1], best[2]


def _gemm(lin, x_scale, out_scale, in_smooth=None):
    wq, ws = _quant_weight(lin.weight, in_smooth)
    acc = x_scale * ws
    m0, sh = multipliers(acc / out_scale)
    return wq, _quant_bias(lin.bias, acc, wq.shape[1]), m0, sh


def quantize(model, stats, qc=QuantConfig(), source=None, progress=True):
    """Build the :class:`QuantizedBert` of FP32 ``model`` from calibration ``stats``."""
    cfg = model.config
    c, heads = cfg.hidden_size, cfg.num_attention_heads
    d_head = c // heads
    n_layers = cfg.num_hidden_layers
    scales = {}

    def s8(name):
        return max(stats.int8_range(name), 1e-8) / 127

    def s16(*names):
        return max(max(stats.max[n] for n in names), 1e-8) * qc.headroom16 / INT16_MAX

    def searched(name, weights):
        return _search_input(torch.cat(stats.samples[name]), weights, qc)

    # int8 GEMM inputs straight out of a LayerNorm: smoothing folds into the LayerNorm's int8 output gain
    smooth_x, smooth_h = [], []
    for i, layer in enumerate(tqdm(model.encoder.layer, desc="searching scales", unit="layer",
                                   leave=False, disable=not progress)):
        att = layer.attention.self
        sm, scales[f"x8.{i}"] = searched(f"x.{i}", [att.query.weight, att.key.weight, att.value.weight])
        smooth_x.append(sm)
        sm, scales[f"h8.{i}"] = searched(f"h.{i}", [layer.intermediate.dense.weight])
        smooth_h.append(sm)
        scales[f"r1.{i}"] = s16(f"x.{i}", f"attn.{i}", f"sum1.{i}")
        scales[f"r2.{i}"] = s16(f"h.{i}", f"f2.{i}", f"sum2.{i}")
    scales["out"] = s16(f"x.{n_layers}")

    emb = model.embeddings
    tables = [emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight]
    emb_scale = max(float(t.detach().abs().max()) for t in tables) / INT16_MAX
    scales["emb"] = emb_scale
    word, position, token_type = (torch.round(t.detach().double() / emb_scale).to(torch.int16) for t in tables)
    ln = emb.LayerNorm
    emb_ln_x8 = layernorm_params(ln.weight / smooth_x[0], ln.bias / smooth_x[0], scales["x8.0"], 8)
    emb_ln_x16 = layernorm_params(ln.weight, ln.bias, scales["r1.0"], 16)

    layers = []
    for i, layer in enumerate(tqdm(model.encoder.layer, desc="quantizing", unit="layer", leave=False,
                                       disable=not progress)):
        att = layer.attention
        x8 = scales[f"x8.{i}"]
        for n in ("q", "k"):
            scales[f"{n}.{i}"] = s8(f"{n}.{i}")
        # V is requantized per channel already; P.V keeps channels apart, so V can use per-channel scales
        v_scale = stats.chan[f"v.{i}"].double().clamp(min=1e-8) / 127
        scales[f"v.{i}"] = v_scale.tolist()
        wq, bq, q_m0, q_sh = _gemm(att.self.query, x8, scales[f"q.{i}"], smooth_x[i])
        wk, bk, k_m0, k_sh = _gemm(att.self.key, x8, scales[f"k.{i}"], smooth_x[i])
        wv, bv, v_m0, v_sh = _gemm(att.self.value, x8, v_scale, smooth_x[i])
        # softmax input at ln2 / 2**m: the most fraction bits that keep the scores inside int16
        score_max = stats.max[f"score.{i}"] * qc.headroom16
        m = max(1, min(10, math.floor(math.log2(INT16_MAX * math.log(2) / score_max))))
        scores_scale = math.log(2) / (1 << m)
        scales[f"score.{i}"] = scores_scale
        score_m0, score_sh = multiplier(scales[f"q.{i}"] * scales[f"k.{i}"] / math.sqrt(d_head) / scores_scale)
        # context per channel: smoothed into Wo, requantized per channel from V's per-channel scale
        sm_ctx, ctx8 = searched(f"ctx.{i}", [att.output.dense.weight])
        scales[f"ctx.{i}"] = (ctx8 * sm_ctx).tolist()
        ctx_m0, ctx_sh = multipliers(v_scale / SOFTMAX_OUT_MAX / (ctx8 * sm_ctx))
        wo, bo, o_m0, o_sh = _gemm(att.output.dense, ctx8, scales[f"r1.{i}"], sm_ctx)
        ln1 = att.output.LayerNorm
        ln1_x8 = layernorm_params(ln1.weight / smooth_h[i], ln1.bias / smooth_h[i], scales[f"h8.{i}"], 8)
        ln1_x16 = layernorm_params(ln1.weight, ln1.bias, scales[f"r2.{i}"], 16)
        scales[f"f1.{i}"] = s16(f"f1.{i}")
        w1, b1, f1_m0, f1_sh = _gemm(layer.intermediate.dense, scales[f"h8.{i}"], scales[f"f1.{i}"], smooth_h[i])
        gelu, gelu_out_scale = gelu_params(scales[f"f1.{i}"])
        # GELU output per channel: the requant after GELU is per channel, so SmoothQuant's division for
        # FFN2 folds into it (in float it has no LayerNorm to fold into)
        sm_g, g8 = searched(f"g.{i}", [layer.output.dense.weight])
        scales[f"g.{i}"] = (g8 * sm_g).tolist()
        g_m0, g_sh = multipliers(gelu_out_scale / (g8 * sm_g))
        w2, b2, f2_m0, f2_sh = _gemm(layer.output.dense, g8, scales[f"r2.{i}"], sm_g)
        ln2 = layer.output.LayerNorm
        last = i == n_layers - 1
        nxt_smooth = torch.ones(c, dtype=torch.float64) if last else smooth_x[i + 1]
        nxt8 = scales["out"] if last else scales[f"x8.{i + 1}"]
        ln2_x8 = layernorm_params(ln2.weight / nxt_smooth, ln2.bias / nxt_smooth, nxt8, 8)
        ln2_x16 = layernorm_params(ln2.weight, ln2.bias, scales["out"] if last else scales[f"r1.{i + 1}"], 16)
        layers.append(LayerParams(
            heads=att.self.query.out_features // d_head,
            wq=wq, bq=bq, q_m0=q_m0, q_shift=q_sh,
            wk=wk, bk=bk, k_m0=k_m0, k_shift=k_sh,
            wv=wv, bv=bv, v_m0=v_m0, v_shift=v_sh,
            score_m0=score_m0, score_shift=score_sh, softmax=softmax_params(m),
            ctx_m0=ctx_m0, ctx_shift=ctx_sh,
            wo=wo, bo=bo, o_m0=o_m0, o_shift=o_sh,
            ln1_x8=ln1_x8, ln1_x16=ln1_x16,
            w1=w1, b1=b1, f1_m0=f1_m0, f1_shift=f1_sh, gelu=gelu, g_m0=g_m0, g_shift=g_sh,
            w2=w2, b2=b2, f2_m0=f2_m0, f2_shift=f2_sh,
            ln2_x8=ln2_x8, ln2_x16=ln2_x16,
        ))

    config = dict(hidden=c, heads=heads, layers=n_layers, intermediate=cfg.intermediate_size,
                  vocab=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
                  type_vocab=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id)
    dims = [(p.heads, p.w1.shape[0]) for p in layers]
    if dims != [(heads, cfg.intermediate_size)] * n_layers:        # pruned: layers differ from the config
        config.update(layer_heads=[h for h, _ in dims], layer_intermediate=[f for _, f in dims])
    src = dict(source or {})
    src["quant_config"] = json.loads(json.dumps(dataclasses.asdict(qc)))     # as the artifact stores it
    return QuantizedBert(config=config, source=src, word=word, position=position, token_type=token_type,
                         emb_ln_x8=emb_ln_x8, emb_ln_x16=emb_ln_x16, layers=layers, scales=scales)


def weights_digest(model):
    """SHA-256 of the FP32 state dict, to tie an artifact to the weights it came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


CALIBRATION_SENTENCES = Path(__file__).with_name("calibration.txt")


def read_sentences(path):
    """Read one sentence per line (blank lines and ``#`` comments skipped); refuses an empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sentence file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 text (byte {raw[e.start]:#04x})") from None
    lines = [l.strip() for l in text.splitlines()]
    sentences = [l for l in lines if l and not l.startswith("#")]
    if not sentences:
        raise ValueError(f"{path} holds no sentences")
    return sentences


def tokenize_calibration(tok, model, sentences=None):
    """Tokenize calibration ``sentences`` (the bundled set by default) one per batch, no padding; refuses a
    sentence longer than the model's positions. Returns ``(batches, count)``."""
    sentences = sentences if sentences is not None else read_sentences(CALIBRATION_SENTENCES)
    limit = model.config.max_position_embeddings
    batches = []
    for s in sentences:
        enc = tok(s, return_tensors="pt")
        if enc["input_ids"].shape[1] > limit:
            raise ValueError(f"calibration sentence is {enc['input_ids'].shape[1]} tokens; the model takes "
                             f"{limit}: {s[:60]!r}")
        batches.append(enc)
    return batches, len(sentences)


def source_of(model, model_dir):
    """The artifact's record of where the FP32 weights came from."""
    from .hf import bundled_model_dir
    model_dir = Path(model_dir)
    bundled = model_dir.resolve() == bundled_model_dir().resolve()
    name = "sentence-transformers/all-MiniLM-L6-v2 (bundled)" if bundled else model_dir.name
    return dict(model=str(model_dir), name=name, weights_sha256=weights_digest(model))


def quantize_pretrained(model_dir=None, calibration=None, qc=QuantConfig(), progress=True):
    """Load a Hugging Face BERT folder (the bundled MiniLM by default), calibrate, and quantize it.

    ``calibration`` is a list of sentences (default: the bundled calibration set). Returns
    ``(QuantizedBert, fp32_model, tokenizer)``.
    """
    from .hf import bundled_model_dir, load_bert, load_tokenizer
    model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
    model, tok = load_bert(model_dir), load_tokenizer(model_dir)
    batches, n = tokenize_calibration(tok, model, calibration)
    stats = calibrate(model, batches, qc.percentile, progress)
    source = dict(source_of(model, model_dir), calibration_sentences=n)
    return quantize(model, stats, qc, source, progress), model, tok
