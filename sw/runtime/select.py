"""Pick backends by name: ``cpu``, ``gpu``, ``sim``, ``auto`` (FPGA board -> GPU -> CPU)."""

import torch

from .base import DeviceError
from .cpu import CpuDevice

__all__ = ["get_device", "device_chain", "DEVICE_NAMES"]

DEVICE_NAMES = ("cpu", "gpu", "sim", "auto")


def get_device(name, **kwargs):
    """Return one backend. Raises ValueError for an unknown name, DeviceError if it is not available."""
    if name == "cpu":
        return CpuDevice()
    if name in ("gpu", "cuda"):
        from .gpu import GpuDevice
        return GpuDevice(**kwargs)
    if name == "sim":
        from .sim import SimDevice
        return SimDevice(**kwargs)
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_NAMES)}")


def device_chain(name="auto", **kwargs):
    """The backends to try, in order, ending with the CPU reference (which cannot fail). ``kwargs`` go
    to the first backend (``waves=`` for ``sim``)."""
    if name == "auto":
        # no board backend yet: the boards issue adds it in front
        names = (["gpu"] if torch.cuda.is_available() else []) + ["cpu"]
    elif name == "cpu":
        names = ["cpu"]
    else:
        names = [name, "gpu", "cpu"] if name == "sim" and torch.cuda.is_available() else [name, "cpu"]
    chain = []
    for n in names:
        try:
            chain.append(get_device(n, **(kwargs if n == name else {})))
        except DeviceError:
            if n == name:
                raise
    return chain
