"""The Hugging Face face of the runtime: ``offload(model)`` returns a drop-in for a BertModel."""

import torch
from torch import nn

from ambert.sw.quant.model import QuantizedBert

from .base import Runner
from .select import device_chain

__all__ = ["OffloadedBert", "offload"]


class OffloadedBert(nn.Module):
    """A BertModel look-alike whose encoder runs as the integer model on a chosen device.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns an object with
    ``last_hidden_state`` (float32, dequantized from the int16 output; ``[0]`` works too), so
    sentence-transformers' ``encode`` and plain Hugging Face code take it unchanged. Padding and batching
    do not change a sentence's bits. ``last_stats`` holds the cost of the last call.
    """

    def __init__(self, quantized, config, devices, progress=False):
        super().__init__()
        self.progress = progress            # a progress bar over the layers of each call (tqdm, on stderr)
        self.quantized = quantized
        self.config = config
        self.runner = Runner(devices)
        self.last_stats = None
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)    # so .device/.to() work

    @property
    def device(self):
        return self._anchor.device

    @property
    def dtype(self):
        return torch.float32

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_dict=True, **_ignored):
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
        if input_ids is None:
            raise ValueError("OffloadedBert needs input_ids (inputs_embeds are not supported)")
        out_device = input_ids.device
        ids = input_ids.cpu()
        mask = None if attention_mask is None else attention_mask.cpu()
        types = None if token_type_ids is None else token_type_ids.cpu()
        self.runner.stats.ops.clear()
        for dev in self.runner.devices:
            dev.stats.reset()
        layer_fn = self.runner.layer_fn(self.quantized.layers)
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(self.quantized.layers), desc=f"layers on {self.runner.devices[0].name}",
                       unit="layer", leave=False)

            def layer_fn(i, *args, _run=layer_fn):
                out = _run(i, *args)
                bar.update()
                return out
        try:
            with torch.no_grad():
                x16 = self.quantized.forward_int(ids, mask, types, layer_fn=layer_fn)
        finally:
            if self.progress:
                bar.close()
        self.last_stats = self.runner.collect_stats()
        hidden = (x16.to(torch.float32) * self.quantized.out_scale).to(out_device)
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden)
        return out if return_dict else (hidden,)


def offload(model, device="auto", quantized=None, tokenizer=None, calibration=None):
    """Quantize a Hugging Face BertModel (or take an existing :class:`QuantizedBert` or artifact path) and
    return an :class:`OffloadedBert` that runs it on ``device`` (``sim``, ``gpu``, ``cpu`` or ``auto``),
    falling back to the next backend for any operation the device cannot take or fails on."""
    from pathlib import Path
    if isinstance(quantized, (str, Path)):
        from ambert.sw.quant import artifact
        quantized = artifact.load(quantized)
    if quantized is None:
        from ambert.sw.quant.hf import load_tokenizer
        from ambert.sw.quant.quantize import CALIBRATION_SENTENCES, calibrate, quantize, read_sentences
        if tokenizer is None:
            tokenizer = load_tokenizer(model.config._name_or_path or None)
        sentences = calibration or read_sentences(CALIBRATION_SENTENCES)
        stats = calibrate(model.eval(), [tokenizer(s, return_tensors="pt") for s in sentences], progress=False)
        quantized = quantize(model, stats, progress=False)
    if not isinstance(quantized, QuantizedBert):
        raise TypeError(f"quantized must be a QuantizedBert or an artifact path, not {type(quantized).__name__}")
    return OffloadedBert(quantized, model.config, device_chain(device))
