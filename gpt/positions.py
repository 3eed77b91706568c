"""Position encodings: learned (GPT-2's), sinusoidal (the original Transformer's) and rotary."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The original Transformer's PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


def rotary_tables(n_pos: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (n_pos, head_dim / 2) for rotary position embedding (RoPE)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by position-dependent angles.
    cos/sin are (B, 1, T, D/2), already gathered at each token's position."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PositionEncoding(nn.Module):
    """Learned (GPT-2's `wpe`, kept as `weight` so the state dict matches GPT-2's layout),
    sinusoidal (added to the embeddings) or rotary (applied to queries and keys)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.pos_encoding
        if self.kind == "learned":
            self.weight = nn.Parameter(torch.zeros(config.block_size, config.n_embd))
        elif self.kind == "sinusoidal":
            self.register_buffer(
                "table", sinusoidal_table(config.block_size, config.n_embd), persistent=False
            )
        else:
            cos, sin = rotary_tables(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def additive(self, pos: Tensor) -> Tensor | None:
        """What to add to the token embeddings at positions `pos` (T,) or (B, T)."""
        if self.kind == "learned":
            return F.embedding(pos, self.weight)
        if self.kind == "sinusoidal":
            return self.table[pos]
        return None

    def rotary(self, pos: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos/sin gathered at `pos`, shaped to broadcast over heads: (B or 1, 1, T, D/2)."""
        if self.kind != "rotary":
            return None
        if pos.dim() == 1:
            pos = pos[None]
        return self.cos[pos][:, None], self.sin[pos][:, None]
