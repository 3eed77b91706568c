"""GPT-2's GELU, the tanh approximation, on our CPU kernel where it runs.

    gelu(x) = 0.5 x (1 + tanh(z)),  z = sqrt(2/pi) (x + 0.044715 x^3)

PyTorch's CPU kernel evaluates tanh, whose vectorised form costs several times an exponential;
`torch.ops.gpt.gelu_tanh` (gpt/kernels/csrc/gelu.c) computes the same function as x sigmoid(2z)
with one exponential, in one pass forward and one backward, within float32 rounding of
PyTorch's. A training step runs it over every position's feed-forward activations, forward and
backward; benchmarks/train.py times the step (docs/benchmarks.md has the figures). At inference
it takes inputs of every size: it is quicker than PyTorch's even on a decode step's one row, and
a row's numbers must not depend on how many rows run with it (a speculative draft's tokens are
verified as rows of one step). In training, small inputs keep PyTorch's, as do other dtypes and
devices, torch.compile (which fuses GELU into its own kernels) and a machine where our kernels
do not build.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

KERNEL_FROM = 1 << 14  # elements: in training, below this the call's overhead outweighs the faster loop


def _kernel_fits(x: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()  # first: a size test here would become a guard of the graph
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        # at inference, whatever the size: a row's numbers must not depend on how many rows
        # run with it (a speculative draft's verification runs its tokens as rows of a step)
        and (x.numel() >= KERNEL_FROM or not torch.is_grad_enabled())
        and kernels.gelu_available()
    )


def gelu_tanh(x: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"); on our kernel where it fits, unless `kernel` is False."""
    if not (kernel and _kernel_fits(x)):
        return F.gelu(x, approximate="tanh")
    return torch.ops.gpt.gelu_tanh(x)  # its backward: gpt.kernels.ops registers it


class GELUTanh(nn.Module):
    """nn.GELU(approximate="tanh"), on our kernel for large float32 CPU inputs (`kernel`: False
    keeps PyTorch's, which gpt.checkpointing does for the blocks it checkpoints)."""

    kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x, self.kernel)
