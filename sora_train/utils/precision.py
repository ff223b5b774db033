"""Dtypes at model boundaries.

Models are single-device and take whatever dtype their weights have: fp32, or bf16 when a
strategy casts them (DeepSpeed's bf16 mode casts the whole trained module and runs it without
autocast). Every tensor made inside a step (noise, timesteps, masks, the video batch made
float on the device, a frozen part's outputs) is cast to the dtype of the weights it reaches
at the boundary of the model it enters, with these helpers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from sora_train.utils.errors import SoraError

# Names a config may give a dtype, by what each means.
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"float32" | "fp32" | "bfloat16" | "bf16"`` (or a torch.dtype) -> torch.dtype.

    fp16 is not offered: frozen VAEs and text encoders overflow in it, and nothing here needs it.
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise SoraError(f"{what}={name}: choose float32 or bfloat16")
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise SoraError(f"{what}={name!r}: choose one of float32, bfloat16") from None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (float32 for a module without any).

    Under ZeRO-3 a partitioned parameter keeps its dtype on an empty placeholder, so this
    holds there too.
    """
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Run a frozen part in its own dtype even inside a bf16-mixed training step (autocast
    would otherwise run its matmuls and convolutions in bf16 whatever its weights are)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


__all__ = ["autocast_off", "module_device", "module_dtype", "parse_dtype"]
