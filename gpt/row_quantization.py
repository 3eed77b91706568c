"""Symmetric int8 quantization of a matrix, one scale per row: the activations of every int8
layer at each call (gpt.quantization) and the weights once, per output channel. Its own module so
that the C kernels' checks (gpt.native) can use it too without an import cycle."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_rows(x: Tensor, dtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per row: x (M, K) ~ scale (M, 1) * q. With
    dtype=torch.uint8, q comes shifted by 128 (a zero point of 128), for kernels that want it."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    # |x / scale| <= 127 by construction (the row's largest entry maps to +-127), so no clamp;
    # few ops matter here: eagerly, a decode step quantizes activations ~50 times
    q = x.div(scale).round_()
    return (q.add_(128) if dtype == torch.uint8 else q).to(dtype), scale
