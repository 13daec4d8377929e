"""ambert: integer-only BERT on an open FPGA accelerator, with the same bits on every backend.

The user-facing names, gathered from the layout packages (``sw`` host software, ``hw`` hardware)::

    import ambert
    module = ambert.offload(hf_bert_model, device="sim")     # "sim", "gpu", "cpu" or "auto"
    module(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state
"""

from hw.isa import AcceleratorConfig
from sw.quant.artifact import ArtifactError
from sw.quant.model import InputError, QuantizedBert
from sw.runtime import DeviceError, OffloadedBert, device_chain, get_device, offload

__all__ = ["offload", "OffloadedBert", "QuantizedBert", "get_device", "device_chain", "AcceleratorConfig",
           "DeviceError", "InputError", "ArtifactError"]
