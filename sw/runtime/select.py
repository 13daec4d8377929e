"""Pick backends by name: ``cpu``, ``gpu``, ``sim``, ``board:PORT[@BAUD]``, ``auto`` (a board named by
``$AMBERT_BOARD`` -> GPU -> CPU)."""

import os

import torch

from .base import DeviceError
from .cpu import CpuDevice

__all__ = ["get_device", "device_chain", "DEVICE_NAMES"]

DEVICE_NAMES = ("cpu", "gpu", "sim", "board:PORT", "auto")


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
    if name.startswith("board:"):
        from .board import DEFAULT_BAUD, BoardDevice
        port, _, baud = name[len("board:"):].partition("@")
        if not port:
            raise ValueError("name the board's serial port: board:/dev/ttyUSB1")
        if baud and not (baud.isdecimal() and int(baud) > 0):
            raise ValueError(f"the baud rate in {name!r} must be a positive whole number, as in "
                             f"board:{port}@{DEFAULT_BAUD}")
        return BoardDevice(port, int(baud) if baud else DEFAULT_BAUD, **kwargs)
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_NAMES)}")


def device_chain(name="auto", **kwargs):
    """The backends to try, in order, ending with the CPU reference (which cannot fail). ``kwargs`` go
    to the first backend (``waves=`` for ``sim``)."""
    if name == "auto":
        board = os.environ.get("AMBERT_BOARD")
        names = ([f"board:{board}"] if board else []) + (["gpu"] if torch.cuda.is_available() else []) + ["cpu"]
    elif name == "cpu":
        names = ["cpu"]
    else:
        names = [name, "gpu", "cpu"] if name != "gpu" and torch.cuda.is_available() else [name, "cpu"]
    chain = []
    for n in names:
        try:
            chain.append(get_device(n, **(kwargs if n == name else {})))
        except DeviceError as e:
            if n == name:
                raise
            import warnings
            warnings.warn(f"{n} is not available ({e}); going on without it", RuntimeWarning, stacklevel=2)
    return chain
