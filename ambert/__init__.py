"""ambert: integer-only BERT on an open FPGA accelerator, with the same bits on every backend.

The user-facing names, imported on first use (so ``import ambert.hw`` loads no torch)::

    import ambert
    module = ambert.offload(hf_bert_model, device="sim")     # "sim", "gpu", "cpu" or "auto"
    module(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state

Subpackages, each importing only those before it: ``ambert.proto`` (the host/accelerator protocol),
``ambert.hw`` (Amaranth), ``ambert.sim`` (Verilator), ``ambert.sw`` (the integer reference, quantizer,
compiler, runtime, command line), ``ambert.boards`` (dev boards).
"""

import importlib

__all__ = ["offload", "OffloadedBert", "QuantizedBert", "get_device", "device_chain", "bundled_model_dir",
           "DeviceShape", "AcceleratorConfig", "Implementation", "DeviceError", "InputError", "ArtifactError",
           "ModelPool"]

_HOMES = {
    "offload": "ambert.sw.runtime", "OffloadedBert": "ambert.sw.runtime", "get_device": "ambert.sw.runtime",
    "device_chain": "ambert.sw.runtime", "DeviceError": "ambert.sw.runtime",
    "QuantizedBert": "ambert.sw.quant.model", "InputError": "ambert.sw.quant.model",
    "ArtifactError": "ambert.sw.quant.artifact", "ModelPool": "ambert.sw.runtime.pool",
    "bundled_model_dir": "ambert.sw.quant.hf",
    "DeviceShape": "ambert.proto.isa", "AcceleratorConfig": "ambert.hw.config", "Implementation": "ambert.hw.config",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'ambert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
