"""The quantized BERT: what ``ambert quantize`` writes and every backend runs."""

import dataclasses
from dataclasses import dataclass, field

import torch

from .ref import LayerNormParams, ref_layer, ref_layernorm

__all__ = ["QuantizedBert", "InputError", "layer_dims", "layer_macs", "encoder_macs"]

# The sequence length at which encoder MACs are counted when a length must be chosen (pruning targets,
# ``ambert info``): the benchmarks' length.
MACS_SEQ = 128


def layer_dims(cfg):
    """``[(heads, ffn), ...]``, one pair per layer, of an artifact config: a pruned model lists its own
    (``layer_heads``, ``layer_intermediate``), a dense one has ``heads`` and ``intermediate`` everywhere.
    The head width is ``hidden // heads`` in both."""
    n = cfg["layers"]
    heads = cfg.get("layer_heads", [cfg["heads"]] * n)
    ffn = cfg.get("layer_intermediate", [cfg["intermediate"]] * n)
    return list(zip(heads, ffn))


def layer_macs(hidden, d_head, heads, ffn, seq):
    """Multiply-accumulates of one encoder layer on ``seq`` tokens: the Q, K, V and output projections,
    the scores and the probabilities times values, and both FFN GEMMs."""
    width = heads * d_head
    return 4 * seq * hidden * width + 2 * seq * seq * width + 2 * seq * hidden * ffn


def encoder_macs(cfg, seq=MACS_SEQ):
    """Encoder multiply-accumulates of the artifact config ``cfg`` for one sequence of ``seq`` tokens."""
    d_head = cfg["hidden"] // cfg["heads"]
    return sum(layer_macs(cfg["hidden"], d_head, h, f, seq) for h, f in layer_dims(cfg))


class InputError(ValueError):
    """Input the model cannot take (empty, too long, wrong dtype); the message says which and why."""


@dataclass(frozen=True)
class QuantizedBert:
    """An integer-only BERT encoder: embedding tables, one :class:`LayerParams` per layer, output scale.

    Tokenization, the embedding lookup (an integer sum of int16 tables) and pooling run on the host;
    everything from the embedding LayerNorm on is the integer contract.
    """
    config: dict                    # hidden, heads, layers, intermediate, vocab, max_positions, type_vocab;
                                    # a pruned model adds layer_heads and layer_intermediate (layer_dims)
    source: dict                    # where it came from: model path/name, weights hash, calibration
    word: torch.Tensor              # int16 [vocab, C]     at emb_scale
    position: torch.Tensor          # int16 [positions, C] at emb_scale
    token_type: torch.Tensor        # int16 [types, C]     at emb_scale
    emb_ln_x8: LayerNormParams
    emb_ln_x16: LayerNormParams
    layers: list = field(default_factory=list)
    scales: dict = field(default_factory=dict)   # float scales of every tensor, for dequantizing and reports

    @property
    def out_scale(self):
        return self.scales["out"]

    def to(self, device):
        """Return a copy with every tensor on ``device`` (``"cuda"`` for the GPU fallback)."""
        return _map_tensors(self, lambda t: t.to(device))

    def check_inputs(self, input_ids, attention_mask=None, token_type_ids=None):
        """Raise :class:`InputError` naming the problem if the model cannot take these inputs."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be an int64 or int32 tensor of token ids, not {got}")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], not shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise InputError(f"empty input: batch {b}, sequence length {t}")
        if t > self.config["max_positions"]:
            raise InputError(f"sequence of {t} tokens is longer than the model's "
                             f"{self.config['max_positions']} positions")
        vocab = self.config["vocab"]
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise InputError(f"token ids must be in [0, {vocab}); got {int(input_ids.min())}.."
                             f"{int(input_ids.max())}")
        for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if extra is not None and tuple(extra.shape) != (b, t):
                raise InputError(f"{name} has shape {tuple(extra.shape)}, input_ids {(b, t)}")
        if token_type_ids is not None and bool(((token_type_ids < 0) |
                                                (token_type_ids >= self.config["type_vocab"])).any()):
            raise InputError(f"token_type_ids must be in [0, {self.config['type_vocab']})")

    def embed(self, input_ids, token_type_ids=None):
        """Return the layer-0 ``(x8, x16)`` of int64 token ids [B, T]."""
        t = input_ids.shape[1]
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        dev = self.word.device
        emb = (self.word[input_ids.to(dev)].to(torch.int32)
               + self.position[:t].to(torch.int32)
               + self.token_type[types.to(dev)].to(torch.int32))
        return tuple(ref_layernorm(emb, [self.emb_ln_x8, self.emb_ln_x16]))

    def forward_int(self, input_ids, attention_mask=None, token_type_ids=None, layer_fn=None):
        """Run the integer encoder; return the int16 last hidden state [B, T, C] at ``out_scale``.

        ``layer_fn(index, x8, x16, mask)`` replaces :func:`ref_layer` (a backend running the layer);
        it must return the same ``(x8, x16)``.
        """
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        mask = None if attention_mask is None else attention_mask.to(torch.bool).to(self.word.device)
        x8, x16 = self.embed(input_ids, token_type_ids)
        for i, p in enumerate(self.layers):
            x8, x16 = (layer_fn(i, x8, x16, mask) if layer_fn else ref_layer(x8, x16, p, mask))
        return x16

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Run the integer encoder; return the last hidden state dequantized to float32."""
        return self.forward_int(input_ids, attention_mask, token_type_ids).to(torch.float32) * self.out_scale


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    return obj
