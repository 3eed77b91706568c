"""Turning a device name from the command line into a usable torch.device."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`name` as a torch.device; ValueError (with a one-line reason) for a malformed name or a
    CUDA device this machine does not have. Shared by gpt-generate, gpt-serve and gpt-train."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{name}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: no CUDA device is available")
    return device
