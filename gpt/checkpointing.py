"""Activation checkpointing: each transformer block keeps only its input during the forward
pass and recomputes its activations in the backward pass (torch.utils.checkpoint, the
non-reentrant kind, per block: gpt.layers.Block), trading about one more forward pass for the
memory of every block's intermediate tensors. The losses and gradients are the plain model's.

    gpt.checkpointing.enable(model)   # both model kinds, with or without LoRA adapters

It applies only in training mode with gradients enabled: evaluation, generation and cached
decoding run the blocks as usual."""

from __future__ import annotations

from torch import nn

from .activations import GELUTanh
from .layers import MLP, Block


def enable(model: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing on (or off) for every Block of `model`; how many."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.checkpointing = on
        for mlp in block.modules():
            if isinstance(mlp, MLP):  # the block's recomputation covers it; hooks would nest
                mlp.recompute_activation = not on
        for act in block.modules():
            if isinstance(act, GELUTanh):
                # torch.utils.checkpoint counts a different number of saved tensors for our
                # kernel's op in the forward and in the recomputation, and refuses to go on
                act.kernel = not on
    return len(blocks)
