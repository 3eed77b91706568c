"""The Transformer block, written once and shared by the GPT and the encoder-decoder: attention
(gpt.attention), optional cross-attention and the feed-forward sublayer, each with its residual
and LayerNorm."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .activations import GELUTanh
from .attention import Attention
from .config import ModelConfig
from .kv_cache import CacheView, LayerCache
from .linear import Linear


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2's tanh approximation) or ReLU (the original).

    In training, c_proj's input (the activation's output, d_ff wide) is not kept for the backward
    pass: the activation's input, which the activation keeps anyway, is, and the activation is
    computed again when c_proj's backward asks for it. One elementwise pass more; a d_ff-wide
    tensor per position less (`recompute_activation`: False keeps it, as gpt.checkpointing does
    for the blocks it recomputes whole)."""

    recompute_activation = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.act = GELUTanh() if config.activation == "gelu" else nn.ReLU()
        self.c_proj = Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        a = self.act(h)
        if not (self.recompute_activation and a.requires_grad) or torch.compiler.is_compiling():
            return self.dropout(self.c_proj(a))
        storage = a.untyped_storage().data_ptr()

        def pack(t: Tensor):
            if t.untyped_storage().data_ptr() != storage:
                return t
            return (h, t.shape, t.stride(), t.storage_offset())  # a view of `a`: of it again later

        def unpack(saved):
            if isinstance(saved, Tensor):
                return saved
            source, shape, stride, offset = saved
            with torch.no_grad():
                return self.act(source).as_strided(shape, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = self.c_proj(a)
        return self.dropout(y)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each with a residual and a
    LayerNorm placed before the sublayer (pre-LN, GPT-2) or after the residual (post-LN, original).
    With `checkpointing` (gpt.checkpointing.enable), a forward pass in training mode with gradients
    keeps only the block's input and recomputes the rest in the backward pass."""

    checkpointing = False

    def __init__(self, config: ModelConfig, cross_attention: bool = False):
        super().__init__()
        norm = lambda: nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)  # noqa: E731
        self.pre_ln = config.norm == "pre"
        self.ln_1, self.attn = norm(), Attention(config)
        self.ln_cross = norm() if cross_attention else None
        self.cross_attn = Attention(config, cross=True) if cross_attention else None
        self.ln_2, self.mlp = norm(), MLP(config)

    def _sublayer(self, x: Tensor, ln: nn.Module, fn) -> Tensor:
        return x + fn(ln(x)) if self.pre_ln else ln(x + fn(x))

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope=None,
        cache: LayerCache | None = None,
        view: CacheView | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        args = (x, mask, is_causal, rope, cache, view, memory, memory_mask)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        rope,
        cache: LayerCache | None,
        view: CacheView | None,
        memory: Tensor | None,
        memory_mask: Tensor | None,
    ) -> Tensor:
        x = self._sublayer(
            x,
            self.ln_1,
            lambda h: self.attn(h, mask=mask, is_causal=is_causal, rope=rope, cache=cache, view=view),
        )
        if self.cross_attn is not None:
            x = self._sublayer(
                x,
                self.ln_cross,
                lambda h: self.cross_attn(h, mask=memory_mask, cache=cache, view=view, memory=memory),
            )
        return self._sublayer(x, self.ln_2, self.mlp)


def final_layer_norm(config: ModelConfig) -> nn.Module:
    """What ends a stack of blocks: post-LN blocks already end in a LayerNorm; pre-LN stacks
    need a final one."""
    if config.norm == "post":
        return nn.Identity()
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


def init_weights(model: nn.Module, config: ModelConfig, n_residual_layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled down by
    1/sqrt(2 * layers) so the residual stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:  # LayerNorm gains
            nn.init.ones_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_residual_layers))
        else:
            nn.init.normal_(p, mean=0.0, std=0.01 if name.endswith("wpe.weight") else 0.02)
