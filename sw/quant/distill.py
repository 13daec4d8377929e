"""Knowledge distillation: the FP32 teacher wins back, on unlabeled sentences, what pruning cost its student.

The student is the teacher cut down to a pruned artifact's plan (``source["pruning"]``; a dense artifact
gives a dense student, which then only learns the quantization). It learns to reproduce the teacher's
outputs, as sentence-transformers' model compression does: the loss is ``1 − cos`` of the mean-pooled
sentence embeddings (what users compare) plus the squared error of every layer's output over real
tokens, relative to the teacher's mean square (TinyBERT's hidden-state matching: a pruned layer keeps
its width, so each layer learns to give what the teacher's layer gave, and the whole output stays in
shape, not only its mean).

**Quantization-aware.** While it learns, the student runs a twin of the integer contract's rounding:
every GEMM weight is rounded to int8 per output channel, every GEMM input to int8 per channel (the
contract requantizes the context and the GELU output per channel and folds SmoothQuant's per-channel
factors into the LayerNorm gains), Q and K to int8 per tensor, each with a straight-through estimator
(the rounding's gradient taken as 1). Activation ranges are running maxima. The twin shapes the float
weights; the artifact is then made by the ordinary quantizer from them, so it is exactly what ``ref_*``
computes, as every artifact is. Softmax, GELU and LayerNorm stay in float in the twin (the contract's
integer forms follow them to within their own rounding).

**Data.** Real English sentences from two text files the ``gensim`` wheel carries as test data (the
project installs it and reads only these; nothing is downloaded): the first 206 articles of an English
Wikipedia dump (``enwiki-…-shortened.bz2``; Wikipedia's text is CC BY-SA), their markup stripped by
gensim's own ``filter_wiki``, and the Lee background corpus (300 news articles of the Australian
Broadcasting Corporation, gathered by Lee, Pincombe and Welsh, 2005, for a study of document
similarity). Sentences also in the calibration set or the evaluation set (``tests/fixtures/
sentences.txt``) are dropped, so the three are disjoint.

**Runs** on the CPU in minutes at the default recipe (or on the GPU when there is one), with a progress
bar and a fixed seed; a checkpoint every ``checkpoint_every`` steps lets an interrupted run resume,
losing at most the steps since the last one. A checkpoint records the teacher's weight digest and the
plan, and is refused for another model.

**What sets the fidelity** is the number of steps and the text, not the form of the loss. On MiniLM with
40% of its MACs pruned (quantized student's mean cosine to FP32 on ``tests/fixtures/sentences.txt``),
300 / 1,000 / 2,000 steps of this recipe give 0.956 / 0.966 / 0.969, while its cosine on the training
batches reaches 0.979 at 1,000 steps: the student fits Wikipedia and news prose better than the short
everyday sentences it is judged on. At 300 steps, fading the pruned units out of the dense student over
the first third instead of cutting them at once (0.955), adding the KL divergence of the kept heads'
attention maps to the teacher's (0.956), and training without the quantization twin (0.956) each land
within 0.001 of the recipe.
"""

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .hf import mean_pool

__all__ = ["DistillConfig", "CORPUS", "training_sentences", "distill", "distill_artifact", "CheckpointError"]

CORPUS = ("206 English Wikipedia articles (CC BY-SA) and the Lee background corpus of 300 ABC news articles, "
          "both from gensim's test data")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])|(?<=[.!?][\"'])\s+")


class CheckpointError(ValueError):
    """A distillation checkpoint that cannot be resumed here; the message says why."""


@dataclass(frozen=True)
class DistillConfig:
    """The recipe. The defaults finish in minutes on two CPU cores for the bundled MiniLM."""
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 30
    hidden_weight: float = 10.0      # weight of the token-level hidden-state term
    seed: int = 0
    checkpoint_every: int = 100
    max_tokens: int = 128            # longer training sentences are dropped, not cut


def _test_data():
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the distillation corpus comes with the gensim package (a dependency of ambert: "
                                "reinstall with `make test` or `pip install gensim==4.4.0`)")
    folder = Path(spec.submodule_search_locations[0]) / "test" / "test_data"
    for name in (_WIKI, _LEE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: the gensim install lacks its test data")
    return folder


_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE = "lee_background.cor"
_MARKUP = re.compile(r"[|{}\[\]<>=*#_]|https?:|\.(jpg|png|svg)\b", re.IGNORECASE)


def _paragraphs():
    """The corpus's paragraphs: the Wikipedia articles' prose (markup stripped by gensim's own
    ``filter_wiki``; lists, tables and headings left out), then the news articles."""
    import bz2
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    folder = _test_data()
    with bz2.BZ2File(folder / _WIKI) as f:
        for _title, text, _id in extract_pages(f, filter_namespaces=("0",)):
            for para in filter_wiki(text).split("\n"):
                para = para.strip()
                if len(para) >= 80 and not para.startswith(("*", "|", "!", "{", "=", ":", ";")):
                    yield para
    yield from (folder / _LEE).read_text(encoding="utf-8").splitlines()


def training_sentences(exclude=()):
    """The corpus split into sentences (4 to 60 words, no markup left, each once), without any sentence in
    ``exclude``; in corpus order."""
    excluded = {" ".join(s.split()) for s in exclude}
    seen, out = set(), []
    for para in _paragraphs():
        for s in _SPLIT.split(para.strip()):
            s = " ".join(s.split())
            if (4 <= len(s.split()) <= 60 and s[:1].isupper() and s[-1:] in ".!?\"'" and not _MARKUP.search(s)
                    and s not in seen and s not in excluded):
                seen.add(s)
                out.append(s)
    return out


def _ste(x, q):
    return x + (q - x).detach()


class _WeightInt8(torch.nn.Module):
    """Parametrization: the weight rounded to int8 per output channel, straight-through."""

    def forward(self, w):
        scale = (w.detach().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        return _ste(w, torch.round(w / scale).clamp(-127, 127) * scale)


class _Int8Range:
    """A running maximum of |x| (per channel or per tensor) and the int8 rounding it implies."""

    def __init__(self, per_channel, momentum=0.9):
        self.per_channel, self.momentum, self.max = per_channel, momentum, None

    def __call__(self, x):
        with torch.no_grad():
            cur = x.detach().abs().reshape(-1, x.shape[-1])
            cur = cur.amax(dim=0) if self.per_channel else cur.amax()
            if self.max is None:
                self.max = cur
            else:
                self.max = self.momentum * self.max + (1 - self.momentum) * cur
        scale = (self.max / 127).clamp(min=1e-8)
        return _ste(x, torch.round(x / scale).clamp(-128, 127) * scale)


def _attach_twin(model):
    """Put the quantization twin on ``model``'s encoder; returns ``(detach, ranges)``: a function that takes
    it off again, and its running ranges (state a checkpoint keeps)."""
    from torch.nn.utils import parametrize
    hooks, linears, ranges = [], [], []
    for layer in model.encoder.layer:
        att = layer.attention
        for lin in (att.self.query, att.self.key, att.self.value, att.output.dense, layer.intermediate.dense,
                    layer.output.dense):
            parametrize.register_parametrization(lin, "weight", _WeightInt8())
            linears.append(lin)
            rng = _Int8Range(per_channel=True)
            ranges.append(rng)
            hooks.append(lin.register_forward_pre_hook(
                lambda _m, inp, rng=rng: (rng(inp[0]),)))
        for lin in (att.self.query, att.self.key):
            rng = _Int8Range(per_channel=False)
            ranges.append(rng)
            hooks.append(lin.register_forward_hook(lambda _m, _inp, out, rng=rng: rng(out)))

    def detach():
        for h in hooks:
            h.remove()
        for lin in linears:
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return detach, ranges


def _loss(student, teacher, mask, hidden_weight):
    """``1 − cos`` of the pooled last hidden states plus ``hidden_weight`` times the mean, over the layers,
    of each layer's output error relative to the teacher's mean square (real tokens only)."""
    cos = (mean_pool(student[-1], mask) * mean_pool(teacher[-1], mask)).sum(-1)
    m = mask.unsqueeze(-1).to(student[-1].dtype)
    mse = sum((((s - t) ** 2) * m).sum() / ((t ** 2) * m).sum().clamp(min=1e-12)
              for s, t in zip(student[1:], teacher[1:])) / (len(teacher) - 1)
    return (1 - cos).mean() + hidden_weight * mse, float(cos.detach().mean())


def _save_checkpoint(path, state):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path, identity):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # a truncated or foreign file: torch raises several types
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start "
                              f"over") from None
    if not isinstance(state, dict) or "identity" not in state:
        raise CheckpointError(f"{path} is not an ambert distillation checkpoint")
    for key, want in identity.items():
        if state["identity"].get(key) != want:
            raise CheckpointError(f"checkpoint {path} belongs to another run: its {key} differs "
                                  f"({str(state['identity'].get(key))[:40]}… here {str(want)[:40]}…); delete it or "
                                  f"name another --checkpoint")
    return state


def _batches(lengths, batch, seed, bucket=64):
    """One epoch's batches of sentence indices, a function of ``seed`` alone (a resumed run draws the same):
    the sentences shuffled, then sorted by length within runs of ``bucket`` batches so a batch pads little,
    then the batches shuffled."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order = order[:len(order) - len(order) % batch]             # whole batches only
    out = []
    for lo in range(0, len(order), batch * bucket):
        run = sorted(order[lo:lo + batch * bucket], key=lengths.__getitem__)
        out += [run[j:j + batch] for j in range(0, len(run), batch)]
    return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]


def distill(teacher, student, tok, sentences, dc=DistillConfig(), checkpoint=None, identity=None,
            device=None, progress=True, zeros=()):
    """Train ``student`` (changed in place) to match ``teacher`` on ``sentences``; returns a dict of the
    run (steps, final loss, mean cosine over the last steps, resumed from). ``zeros``: (weight, mask)
    pairs, the weights kept zero where the mask is False (pruned tiles stay pruned)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dc.steps < 1 or dc.batch < 1:
        raise ValueError(f"steps and batch must be at least 1 (got {dc.steps}, {dc.batch})")
    limit = min(dc.max_tokens, teacher.config.max_position_embeddings)
    kept = [(s, n) for s, n in zip(sentences, map(len, tok(list(sentences))["input_ids"])) if n <= limit]
    sentences, lengths = [s for s, _ in kept], [n for _, n in kept]
    if len(sentences) < dc.batch:
        raise ValueError(f"{len(sentences)} training sentences are fewer than one batch of {dc.batch}")
    identity = dict(identity or {}, sentences=len(sentences), batch=dc.batch, seed=dc.seed)
    teacher = teacher.to(device).eval()
    student = student.to(device)
    detach, ranges = _attach_twin(student)

    @torch.no_grad()
    def rezero():
        for w, keep in zeros:
            w.mul_(keep.to(w.device, w.dtype))
    rezero()
    try:
        opt = torch.optim.AdamW(student.parameters(), lr=dc.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / dc.warmup) *
                                                  max(0.0, 1 - s / dc.steps))
        start, resumed = 0, None
        if checkpoint is not None and Path(checkpoint).exists():
            state = _load_checkpoint(checkpoint, identity)
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            for rng, m in zip(ranges, state["ranges"]):
                rng.max = m.to(device)
            start = resumed = state["step"]
        per_epoch = len(sentences) // dc.batch
        epoch_batches = {}
        history = []
        student.eval()             # no dropout: the student copies a deterministic teacher
        with tqdm(total=dc.steps, initial=start, desc="distilling", unit="step", disable=not progress) as bar:
            for step in range(start, dc.steps):
                epoch, i = divmod(step, per_epoch)
                if epoch not in epoch_batches:
                    epoch_batches = {epoch: _batches(lengths, dc.batch, dc.seed + epoch)}
                batch = [sentences[j] for j in epoch_batches[epoch][i]]
                enc = {k: v.to(device) for k, v in tok(batch, padding=True, return_tensors="pt").items()}
                with torch.no_grad():
                    want = teacher(**enc, output_hidden_states=True).hidden_states
                got = student(**enc, output_hidden_states=True).hidden_states
                loss, cos = _loss(got, want, enc["attention_mask"], dc.hidden_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                rezero()
                sched.step()
                history.append((float(loss.detach()), cos))
                bar.set_postfix(loss=f"{history[-1][0]:.4f}", cos=f"{cos:.4f}")
                bar.update()
                if checkpoint is not None and ((step + 1) % dc.checkpoint_every == 0 or step + 1 == dc.steps):
                    _save_checkpoint(checkpoint, dict(identity=identity, step=step + 1,
                                                      student=student.state_dict(), optimizer=opt.state_dict(),
                                                      scheduler=sched.state_dict(),
                                                      ranges=[r.max for r in ranges]))
    finally:
        detach()
    student.to("cpu")
    teacher.to("cpu")
    tail = history[-20:] or [(math.nan, math.nan)]
    return dict(steps=dc.steps, resumed_from=resumed, loss=sum(l for l, _ in tail) / len(tail),
                train_cos=sum(c for _, c in tail) / len(tail))


def distill_artifact(artifact_path, model_dir=None, dc=DistillConfig(), checkpoint=None, calibration=None,
                     exclude=(), progress=True):
    """Distill the student that the artifact at ``artifact_path`` was made from (its pruning plan applied to
    the teacher in ``model_dir``, the bundled MiniLM by default), then calibrate and quantize it.

    Returns ``(QuantizedBert, student, tokenizer)``; the new artifact keeps the pruning record and adds
    ``source["distillation"]``."""
    from . import artifact as art
    from .hf import bundled_model_dir, load_bert, load_tokenizer
    from .prune import PrunePlan, apply_plan
    from .quantize import (CALIBRATION_SENTENCES, QuantConfig, calibrate, quantize, read_sentences, source_of,
                           tokenize_calibration)
    header = art.read_header(artifact_path)
    model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
    teacher, tok = load_bert(model_dir), load_tokenizer(model_dir)
    source = source_of(teacher, model_dir)
    src = header["source"]
    if src.get("weights_sha256") != source["weights_sha256"]:
        raise ValueError(f"{artifact_path} was made from other weights than {model_dir} ({src.get('name')}); "
                         f"name its teacher with --model")
    student = load_bert(model_dir)
    plan = PrunePlan.from_json(src["pruning"]["plan"]) if "pruning" in src else PrunePlan.dense(student)
    apply_plan(student, plan)
    zeros = _pruned_tiles(art.load(artifact_path), student, src) if src.get("pruning", {}).get("tiles_zeroed") else []
    calib = calibration if calibration is not None else read_sentences(CALIBRATION_SENTENCES)
    sentences = training_sentences(exclude=list(calib) + list(exclude))
    identity = dict(teacher=source["weights_sha256"], plan=plan.to_json(),
                    zero_tiles=sum(int((~keep).sum()) for _, keep in zeros))
    run = distill(teacher, student, tok, sentences, dc, checkpoint, identity, progress=progress, zeros=zeros)
    qc = QuantConfig()
    batches, n = tokenize_calibration(tok, student, calib)
    stats = calibrate(student, batches, qc.percentile, progress)
    source.update(calibration_sentences=n, distillation=dict(
        run, corpus=CORPUS, sentences=len(sentences), batch=dc.batch, lr=dc.lr, seed=dc.seed,
        loss_form="1 - cos(mean-pooled) + mean over layers of MSE(hidden) / teacher mean square",
        quantization_aware=True))
    if "pruning" in src:
        source["pruning"] = src["pruning"]
    return quantize(student, stats, qc, source, progress), student, tok


def _pruned_tiles(qm, student, src):
    """The (weight, mask) pairs of a tile-pruned artifact's student: its six matrices a layer, each False
    on the ``lanes x lanes`` tiles that are all zero in the artifact's int8 weights."""
    from .artifact import tiles_of
    from .prune import _linears
    lanes = int(src["pruning"]["lanes"])
    names = {"query": "wq", "key": "wk", "value": "wv", "output": "wo", "ffn1": "w1", "ffn2": "w2"}
    pairs = []
    for i, name, lin in _linears(student):
        q = getattr(qm.layers[i], names[name])
        if tuple(q.shape) != tuple(lin.weight.shape):
            raise ValueError(f"the artifact's layer {i} {name} is {tuple(q.shape)}, its student's "
                             f"{tuple(lin.weight.shape)}: not the model the artifact was pruned from")
        n, k = q.shape
        keep = tiles_of(q, lanes)[1].repeat_interleave(lanes, 0).repeat_interleave(lanes, 1)[:n, :k]
        pairs.append((lin.weight, keep))
    return pairs
