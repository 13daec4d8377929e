"""Structured pruning of a Hugging Face BERT: attention heads and FFN neurons physically removed, and
weight tiles of the array's size zeroed.

A pruned unit is gone, not zeroed: its rows of W_Q, W_K, W_V (a head) or of W_1 (a neuron) and its
columns of W_O or W_2 are cut out, so every GEMM of the layer is smaller, the artifact stores less and
the device runs fewer tiles. Layers then differ in shape (``layer_dims`` of the artifact config).

**Importance** is what removing a unit costs the sentence embedding (mean-pooled, L2-normalised: what
users compare). Every head and neuron gets a mask m (1 = kept) on its output; to second order, removing
unit u raises the squared embedding error by ``½ ‖∂y/∂m_u‖²`` (the Gauss-Newton term: the first-order
term vanishes, since the loss against the unpruned model's own output is at its minimum), estimated with
random probes ``E_r[(rᵀ ∂y/∂m_u)²]`` (one backward pass each) and averaged over sentences. Heads and
neurons are scored in the same unit, so they compete in one ranking. Weight magnitudes ignore what the
activations do; movement and first-order (Taylor) scores need a task loss or fine-tuning, and there is
none here; a unit's output norm against its layer's residual ranks heads far below neurons (at 40% of
MiniLM's MACs it removes 66 of 72 heads, and cosine to FP32 falls to 0.59, against 0.86 here).

**Choice.** Units are removed greedily, least score per MAC saved first, until the asked fraction of
the encoder's MACs (at :data:`MACS_SEQ` tokens) is gone, in a few rounds with the scores measured again
on what is left (removing a unit changes what the others matter). Neurons go in blocks of ``lanes`` from
a layer (the array's width: a layer keeps a whole number of n-tiles), its lowest-scored first; every
layer keeps at least one head, one block of neurons and, of its own MACs, ``floor`` times the share the
whole model keeps (:data:`LAYER_FLOOR` by default: at 40% removed, 45% of each layer's MACs). The scores
say what a unit costs the model as it is, not what distillation can win back: at 40% of MiniLM's MACs
the ranking alone leaves layers 1 and 2 with 2 of 12 heads and a third of their FFN, about as faithful
before distillation as a floored plan, and that student distils worse (quantized student's mean cosine
to FP32 after 300 steps of the default recipe: 0.950 with no floor; each layer keeping 45, 50 or 55% of
its MACs, 0.956, 0.956, 0.953; keeping 45% with the units scored on 256 sentences of the distillation
corpus instead of the 48 calibration ones, 0.948).

**Tiles** (``lanes x lanes`` blocks of a layer's six weight matrices, all zero): the compiler neither
sends nor stores them and the device neither loads nor streams them (MATMUL chains, ``proto.isa.Chain``).
A tile is scored like a head: a mask on the tile's weights, the Gauss-Newton term of the embedding error
``½ E_r[(Σ_tile W ⊙ ∂(rᵀy)/∂W)²]`` — one backward pass a probe scores every tile of every matrix — so
tiles of all matrices and layers compete in one ranking, least score per MAC first. (Wanda's
``Σ |W|·‖X‖`` with the same share of every matrix, tried first, keeps a mean cosine to FP32 of only
0.85 at 10% of the MACs and 0.62 at 25%: it cannot see which matrices the embedding depends on.) Every
n-tile keeps its best tile (an all-zero output channel has no weight scale to quantize). With heads or
neurons too, ``tile_share`` of the MACs to remove goes to tiles, the rest to the structural units,
which go first.
"""

import heapq
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .hf import mean_pool
from .model import MACS_SEQ, layer_macs

__all__ = ["PrunePlan", "GRANULARITIES", "STRUCTURAL", "importance", "tile_scores", "zero_tiles", "choose_plan",
           "apply_plan", "prune", "describe", "prune_pretrained", "LAYER_FLOOR"]

GRANULARITIES = ("heads", "neurons", "tiles")
STRUCTURAL = ("heads", "neurons")
LAYER_FLOOR = 0.75         # each layer keeps this times the share of MACs the model keeps (module docstring: why)


@dataclass(frozen=True)
class PrunePlan:
    """What a pruned model keeps: per layer, the original indices of its heads and FFN neurons."""
    heads: tuple          # tuple of sorted tuples of kept head indices, one per layer
    neurons: tuple        # likewise for FFN neurons

    def to_json(self):
        return dict(heads=[list(h) for h in self.heads], neurons=[list(n) for n in self.neurons])

    @classmethod
    def from_json(cls, d):
        try:
            return cls(tuple(tuple(int(i) for i in h) for h in d["heads"]),
                       tuple(tuple(int(i) for i in n) for n in d["neurons"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed pruning plan: {e}") from None

    @classmethod
    def dense(cls, model):
        return cls(tuple(tuple(range(h)) for h, _ in _dims(model)),
                   tuple(tuple(range(f)) for _, f in _dims(model)))


def _d_head(model):
    return model.config.hidden_size // model.config.num_attention_heads


def _dims(model):
    d = _d_head(model)
    return [(layer.attention.self.query.out_features // d, layer.intermediate.dense.out_features)
            for layer in model.encoder.layer]


def _probed(model, batches, inputs, probes, seed, desc, progress):
    """For each sentence of ``batches`` and each of ``probes`` random directions r (seeded), the gradients
    of rᵀy, y the sentence embedding, with respect to ``inputs``: what the Gauss-Newton estimate averages
    (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for enc in tqdm(batches, desc=desc, unit="sent", disable=not progress):
        y = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        for k in range(probes):
            r = torch.randn(y.shape, generator=gen)
            yield torch.autograd.grad((y * r).sum(), inputs, retain_graph=k < probes - 1)


def importance(model, batches, probes=4, seed=0, progress=True):
    """Score every head and FFN neuron of ``model`` on ``batches`` (tokenized sentences, one per batch).

    Returns ``(heads, neurons)``: lists with one float64 tensor per layer ([heads], [ffn]), each unit's
    estimated increase of the squared error of the sentence embedding when it is removed (see the module
    docstring), averaged over sentences."""
    d = _d_head(model)
    dims = _dims(model)
    masks = [torch.ones(h, requires_grad=True) for h, _ in dims] + [torch.ones(f, requires_grad=True)
                                                                     for _, f in dims]
    sums = [torch.zeros(m.shape, dtype=torch.float64) for m in masks]
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        hooks += [layer.attention.output.dense.register_forward_pre_hook(
                      lambda _m, inp, m=masks[i]: (inp[0] * m.repeat_interleave(d),)),
                  layer.output.dense.register_forward_pre_hook(
                      lambda _m, inp, m=masks[len(dims) + i]: (inp[0] * m,))]
    needs = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for grads in _probed(model, batches, masks, probes, seed, "scoring heads and neurons", progress):
            for acc, g in zip(sums, grads):
                acc += g.double() ** 2
    finally:
        for h in hooks:
            h.remove()
        for p, n in zip(model.parameters(), needs):
            p.requires_grad_(n)
    if not batches:
        raise ValueError("importance needs at least one sentence")
    scale = 1 / (2 * len(batches) * probes)
    return [s * scale for s in sums[:len(dims)]], [s * scale for s in sums[len(dims):]]


def _check(fraction, granularity):
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of MACs to remove must be in [0, 1), not {fraction}")
    unknown = sorted(set(granularity) - set(GRANULARITIES))
    if unknown or not granularity:
        raise ValueError(f"unknown pruning granularity {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(GRANULARITIES)}")


def _check_floor(floor):
    if not 0 <= floor < 1:
        raise ValueError(f"the layer floor (each layer keeps that times the share of MACs the model keeps) must "
                         f"be in [0, 1), not {floor}")


def choose_plan(model, heads_score, neurons_score, remove_macs, granularity=GRANULARITIES, seq=MACS_SEQ,
                lanes=16, floors=None):
    """The :class:`PrunePlan` (indices into ``model``'s layers) removing at least ``remove_macs`` of its
    encoder MACs at ``seq`` tokens, least score per MAC first.

    ``granularity`` names what may go (a subset of :data:`GRANULARITIES`); ``floors``, if given, the MACs
    each layer keeps at least. Raises ValueError for an unknown granularity or a target those
    granularities and floors cannot reach."""
    granularity = tuple(g for g in granularity if g in STRUCTURAL)
    _check(0, granularity)
    c, d = model.config.hidden_size, _d_head(model)
    dims = _dims(model)
    left = [layer_macs(c, d, h, f, seq) for h, f in dims]
    floors = floors if floors is not None else [0] * len(dims)
    head_macs = layer_macs(c, d, 1, 0, seq)
    neuron_macs = layer_macs(c, d, 0, 1, seq)
    kept_heads = [set(range(h)) for h, _ in dims]
    kept_neurons = [set(range(f)) for _, f in dims]
    order = [torch.argsort(s).tolist() for s in neurons_score]       # lowest score first, per layer
    heap = []
    if "heads" in granularity:
        for i, s in enumerate(heads_score):
            heap += [(float(s[h]) / head_macs, "head", i, (h,)) for h in range(len(s))]
    taken = [0] * len(dims)                    # neurons of each layer removed so far, lowest score first

    def push_block(i):
        rest = dims[i][1] - taken[i]
        size = rest % lanes or lanes           # a first odd block leaves a whole number of lanes behind
        if rest - size >= lanes:               # every layer keeps one block at least
            block = order[i][taken[i]:taken[i] + size]
            score = float(neurons_score[i][block].sum()) / (neuron_macs * size)
            heapq.heappush(heap, (score, "neurons", i, tuple(block)))

    heapq.heapify(heap)
    if "neurons" in granularity:
        for i in range(len(dims)):
            push_block(i)
    removed = 0
    while removed < remove_macs:
        if not heap:
            raise ValueError(f"pruning {' and '.join(granularity)} cannot remove that much: each layer keeps "
                             f"one head, {lanes} neurons and its floor of MACs")
        _, kind, i, units = heapq.heappop(heap)
        macs = head_macs if kind == "head" else neuron_macs * len(units)
        if left[i] - macs < floors[i]:
            continue                           # the layer is at its floor: nothing more of it goes
        if kind == "head":
            if len(kept_heads[i]) == 1:
                continue
            kept_heads[i].discard(units[0])
        else:
            kept_neurons[i].difference_update(units)
            taken[i] += len(units)
            push_block(i)
        removed += macs
        left[i] -= macs
    return PrunePlan(tuple(tuple(sorted(h)) for h in kept_heads), tuple(tuple(sorted(n)) for n in kept_neurons))


def _keep_rows(linear, index, dim):
    """``linear`` cut down to ``index`` along its output (dim 0) or input (dim 1) features, in place."""
    w = linear.weight.data.index_select(dim, index).clone()
    linear.weight = torch.nn.Parameter(w, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.bias = torch.nn.Parameter(linear.bias.data.index_select(0, index).clone(),
                                         requires_grad=linear.bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


@torch.no_grad()
def apply_plan(model, plan):
    """Cut ``model`` (a Hugging Face BertModel, changed in place) down to ``plan``; returns it.

    The plan's indices are ``model``'s own heads and neurons (a dense model's, for the plan an artifact
    records); a plan that does not fit its layers is refused (ValueError)."""
    d = _d_head(model)
    dims = _dims(model)
    if len(plan.heads) != len(dims) or len(plan.neurons) != len(dims):
        raise ValueError(f"the pruning plan has {len(plan.heads)} layers, the model {len(dims)}")
    for i, ((h, f), heads, neurons) in enumerate(zip(dims, plan.heads, plan.neurons)):
        if not heads or not neurons or max(heads) >= h or max(neurons) >= f or min(heads + neurons) < 0 \
                or len(set(heads)) != len(heads) or len(set(neurons)) != len(neurons):
            raise ValueError(f"the pruning plan does not fit layer {i} of the model ({h} heads, {f} neurons)")
    for layer, heads, neurons in zip(model.encoder.layer, plan.heads, plan.neurons):
        att = layer.attention
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        for lin in (att.self.query, att.self.key, att.self.value):
            _keep_rows(lin, cols, 0)
        _keep_rows(att.output.dense, cols, 1)
        att.self.num_attention_heads = len(heads)
        att.self.all_head_size = len(heads) * d
        idx = torch.tensor(neurons, dtype=torch.long)
        _keep_rows(layer.intermediate.dense, idx, 0)
        _keep_rows(layer.output.dense, idx, 1)
    return model


def describe(plan, dense_dims, hidden, d_head, seq=MACS_SEQ):
    """The artifact's record of a pruning: the plan, what went, and the MACs left (for ``ambert info``)."""
    dense = sum(layer_macs(hidden, d_head, h, f, seq) for h, f in dense_dims)
    left = sum(layer_macs(hidden, d_head, len(h), len(n), seq) for h, n in zip(plan.heads, plan.neurons))
    return dict(plan=plan.to_json(), macs_seq=seq, dense_macs=dense, macs_left=left,
                heads_removed=sum(h for h, _ in dense_dims) - sum(len(h) for h in plan.heads),
                neurons_removed=sum(f for _, f in dense_dims) - sum(len(n) for n in plan.neurons),
                importance="embedding error, second order (Gauss-Newton, random probes)")


def _linears(model):
    """Each layer's six weight matrices, in the order the contract runs them."""
    return [(i, name, lin) for i, layer in enumerate(model.encoder.layer)
            for name, lin in (("query", layer.attention.self.query), ("key", layer.attention.self.key),
                              ("value", layer.attention.self.value), ("output", layer.attention.output.dense),
                              ("ffn1", layer.intermediate.dense), ("ffn2", layer.output.dense))]


def tile_scores(model, batches, lanes=16, probes=4, seed=0, progress=True):
    """Scores of every ``lanes x lanes`` weight tile (see the module docstring): one float64 tensor
    [n-tiles, k-tiles] per matrix of :func:`_linears`, each tile's estimated increase of the squared
    error of the sentence embedding when it is zeroed, in the unit of :func:`importance`."""
    linears = _linears(model)
    weights = [lin.weight for _, _, lin in linears]
    shapes = [(-(-w.shape[0] // lanes), -(-w.shape[1] // lanes)) for w in weights]
    sums = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    needs = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        for grads in _probed(model, batches, weights, probes, seed, "scoring weight tiles", progress):
            for acc, w, g, (nt, kt) in zip(sums, weights, grads, shapes):
                # d(r.y)/d(mask of a tile) = sum over the tile of W * dW
                wg = torch.zeros(nt * lanes, kt * lanes, dtype=torch.float64)
                wg[:w.shape[0], :w.shape[1]] = (w.detach() * g).double()
                acc += wg.reshape(nt, lanes, kt, lanes).sum(dim=(1, 3)) ** 2
    finally:
        for p, n in zip(model.parameters(), needs):
            p.requires_grad_(n)
    if not batches:
        raise ValueError("tile scores need at least one sentence")
    scale = 1 / (2 * len(batches) * probes)
    return [s * scale for s in sums]


@torch.no_grad()
def zero_tiles(model, scores, remove_macs, lanes=16, seq=MACS_SEQ):
    """Zero tiles, least score per MAC first across every matrix, until at least ``remove_macs`` encoder
    MACs at ``seq`` tokens are gone; every n-tile keeps its best tile. Returns ``(tiles zeroed, MACs
    removed)``; raises ValueError if the tiles cannot remove that much."""
    linears = _linears(model)
    candidates = []
    for m, ((_, _, lin), score) in enumerate(zip(linears, scores)):
        n, k = lin.weight.shape
        nt, kt = score.shape
        best = score.argmax(dim=1).tolist()
        for t in range(nt):
            for j in range(kt):
                if j != best[t]:
                    macs = min(lanes, n - t * lanes) * min(lanes, k - j * lanes) * seq
                    candidates.append((float(score[t, j]) / macs, macs, m, t, j))
    most = sum(c[1] for c in candidates)
    if remove_macs > most:
        total = sum(lin.weight.numel() for _, _, lin in linears) * seq
        raise ValueError(f"weight tiles cannot remove {remove_macs / 1e6:.1f} M MACs: every n-tile keeps one "
                         f"tile, so at most {most / 1e6:.1f} M of the matrices' {total / 1e6:.1f} M can go")
    candidates.sort()
    zeroed, removed = 0, 0
    for _, macs, m, t, j in candidates:
        if removed >= remove_macs:
            break
        linears[m][2].weight.data[t * lanes:(t + 1) * lanes, j * lanes:(j + 1) * lanes] = 0
        removed += macs
        zeroed += 1
    return zeroed, removed


def prune(model, batches, fraction, granularity=GRANULARITIES, seq=MACS_SEQ, lanes=16, rounds=4,
          progress=True, floor=0.0):
    """Prune ``model`` (a dense Hugging Face BertModel, cut down in place) by ``fraction`` of its encoder
    MACs at ``seq`` tokens, scoring on ``batches`` (tokenized sentences, one per batch) in ``rounds``
    rounds; every layer keeps at least ``floor * (1 - fraction)`` of its own MACs. Returns the
    :class:`PrunePlan` in the dense model's indices. (Heads and neurons only: the tiles of ``granularity``
    are :func:`zero_tiles`'.)"""
    granularity = tuple(g for g in granularity if g in STRUCTURAL)
    _check(fraction, granularity)
    _check_floor(floor)
    c, d = model.config.hidden_size, _d_head(model)
    floors = [floor * (1 - fraction) * layer_macs(c, d, h, f, seq) for h, f in _dims(model)]
    dense = sum(layer_macs(c, d, h, f, seq) for h, f in _dims(model))
    kept = PrunePlan.dense(model)
    with tqdm(total=rounds, desc=f"pruning {fraction:.0%} of the MACs", unit="round",
              disable=not progress) as bar:
        for k in range(1, rounds + 1):
            now = sum(layer_macs(c, d, h, f, seq) for h, f in _dims(model))
            goal = dense * (1 - fraction * k / rounds)
            if now > goal:
                heads, neurons = importance(model, batches, progress=False)
                try:
                    step = choose_plan(model, heads, neurons, now - goal, granularity, seq, lanes, floors)
                except ValueError:
                    raise ValueError(f"pruning {' and '.join(granularity)} cannot remove {fraction:.1%} of the "
                                     f"encoder's MACs: each layer keeps one head, {lanes} neurons and "
                                     f"{floor * (1 - fraction):.0%} of its MACs") from None
                apply_plan(model, step)
                kept = PrunePlan(tuple(tuple(old[j] for j in new) for old, new in zip(kept.heads, step.heads)),
                                 tuple(tuple(old[j] for j in new) for old, new in zip(kept.neurons, step.neurons)))
            bar.update()
    return kept


def prune_pretrained(fraction, granularity=STRUCTURAL, model_dir=None, calibration=None, seq=MACS_SEQ,
                     lanes=16, progress=True, tile_share=0.5, floor=LAYER_FLOOR):
    """Prune a Hugging Face BERT folder (the bundled MiniLM by default) by ``fraction`` of its encoder MACs,
    then calibrate and quantize what is left. With tiles among ``granularity`` besides heads or neurons,
    ``tile_share`` of the MACs removed are the tiles'. Heads and neurons leave each layer at least ``floor``
    times the share of MACs they leave the model.

    Importance is scored on the calibration sentences (the bundled set by default). Returns
    ``(QuantizedBert, pruned fp32 model, tokenizer)``; the artifact's ``source["pruning"]`` records the plan.
    """
    from .hf import bundled_model_dir, load_bert, load_tokenizer
    from .quantize import QuantConfig, calibrate, quantize, source_of, tokenize_calibration
    _check(fraction, tuple(granularity))
    _check_floor(floor)
    model_dir = model_dir if model_dir is not None else bundled_model_dir()
    model, tok = load_bert(model_dir), load_tokenizer(model_dir)
    source = source_of(model, model_dir)
    batches, n_sentences = tokenize_calibration(tok, model, calibration)
    dense_dims = _dims(model)
    structural = [g for g in granularity if g in STRUCTURAL]
    tiles = "tiles" in granularity
    if not 0 <= tile_share <= 1:
        raise ValueError(f"the tiles' share of the MACs removed must be in [0, 1], not {tile_share}")
    share = (tile_share if structural else 1) if tiles else 0
    plan = PrunePlan.dense(model)
    if structural and fraction * (1 - share) > 0:
        plan = prune(model, batches, fraction * (1 - share), structural, seq, lanes, progress=progress,
                     floor=floor)
    record = describe(plan, dense_dims, model.config.hidden_size, _d_head(model), seq)
    if tiles:
        left = record["macs_left"] - (1 - fraction) * record["dense_macs"]
        zeroed, gone = (zero_tiles(model, tile_scores(model, batches, lanes, progress=progress), left, lanes, seq)
                        if left > 0 else (0, 0))
        record.update(tiles_zeroed=zeroed, tile_macs_removed=gone, macs_left=record["macs_left"] - gone,
                      tile_importance="embedding error, second order (Gauss-Newton, random probes)")
    qc = QuantConfig()
    stats = calibrate(model, batches, qc.percentile, progress)
    source.update(calibration_sentences=n_sentences,
                  pruning=dict(record, fraction=fraction, granularity=list(granularity), lanes=lanes,
                               layer_floor=floor,
                               layer_min_share=floor * (1 - fraction * (1 - share)) if structural else 0.0))
    return quantize(model, stats, qc, source, progress), model, tok
