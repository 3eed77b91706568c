"""LoRA (Hu et al., 2021): fine-tune a model through small low-rank adapters beside its frozen
linear layers, y = W x + b + (alpha / r) * B A dropout(x), with A (r x in) random and B (out x r)
zero, so training starts from the model as it was. Only A and B (and optionally the biases) need
gradients and optimizer state; `merged` folds B A into W for a plain model again.

    lora.apply(model, rank=8, alpha=16)       # freezes the model, adds adapters in place
    ... train ...
    plain = lora.merged(model)                # a copy without adapters: gpt.save, serve, ...
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .linear import Linear

# the attention and MLP projections of both model kinds (c_proj is in both)
DEFAULT_TARGETS = ("c_attn", "q_proj", "kv_proj", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


def apply(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    train_biases: bool = False,
) -> list[str]:
    """Freeze `model` and wrap each linear layer whose name ends in one of `targets` in a
    LoRALinear; with `train_biases`, the biases of every layer train too. alpha defaults to 2 x
    rank. Returns the wrapped layers' names; a ValueError if none matched."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if dropout < 0 or dropout >= 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    alpha = 2.0 * rank if alpha is None else alpha
    for p in model.parameters():
        p.requires_grad_(False)
    if train_biases:
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no linear layer is named {', '.join(targets)}; this model's are {', '.join(names)}"
        )
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(m, rank, alpha, dropout))
    return [name for name, _ in found]


def adapters(model: nn.Module) -> dict[str, Tensor]:
    """What training changed: every trainable parameter (the adapters, and biases if trained),
    by name, detached."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put back what `adapters` returned (on a model given the same `apply`)."""
    own = dict(model.named_parameters())
    missing = sorted(set(k for k, p in own.items() if p.requires_grad) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        raise ValueError(
            f"the saved adapters do not fit this model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its layer's weight: the plain model
    again (same classes, same state dict keys as before `apply`), ready to save or serve."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoRALinear):
            base = m.base
            # skip_init: no random initialisation, which would also move the global RNG (a training
            # run merges at every checkpoint, and its dropout must not notice)
            layer = nn.utils.skip_init(
                Linear,
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
            layer.weight.copy_(m.merged_weight())
            if base.bias is not None:
                layer.bias.copy_(base.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, layer)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )
