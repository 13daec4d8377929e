"""The host runtime: run the quantized BERT on a device — the simulated accelerator, the GPU, the CPU —
with per-operation fallback, and hand it back to Hugging Face code as a drop-in module."""

from .base import Device, DeviceError, DeviceUnsupported, Runner, Stats
from .select import get_device, device_chain
from .hf import OffloadedBert, offload

__all__ = ["Device", "DeviceError", "DeviceUnsupported", "Runner", "Stats", "get_device", "device_chain",
           "OffloadedBert", "offload"]
