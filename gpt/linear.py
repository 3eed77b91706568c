"""The linear layer of every model: nn.Linear with inference on the fastest kernel this CPU has
for the call (our single-row kernel, oneDNN's GEMM on a packed weight, or PyTorch's)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import kernels, step_rows
from .packing import is_current, stamp
from .quantization import Int8Linear


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()
# oneDNN's call has a fixed cost of its own, more than a small layer's product saves on it
_ONEDNN_MIN_WEIGHT = 1 << 19
# Layers below that size go to MKL's sgemm, whose calls of a few rows cost several times one row
# (a fixed cost, not arithmetic); our kernel's cost grows with the rows from a smaller start.
# Up to this many rows (a speculative draft being verified) they run on ours, which also gives
# each row the same numbers as a call of that row alone.
_NATIVE_SMALL_ROWS = 16


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs inference on oneDNN's GEMM.

    On CPU in fp32, F.linear goes to MKL's sgemm, whose products of a few rows (decode steps,
    the lm_head included) read the weight more slowly than oneDNN's kernel, and whose
    single-row product runs on one core only. oneDNN's op has no backward, so training (grad
    enabled) keeps F.linear, and so does torch.compile, which picks its own kernels.

    `pack()` adds a copy of the weight in oneDNN's blocked layout. Given the plain layout,
    oneDNN reorders the weight on every call that has more than one row; the packed copy saves
    that work on every batched step and prefill. The copy costs the weight's memory again, so
    packing is opt-in (`pack_linear_weights(model)`; the server does it).

    A single row (the decode step of one stream) runs on our own matrix-vector kernel where it
    could be built (`gpt.kernels`), eagerly and under torch.compile, and on the plain weight with
    oneDNN elsewhere.
    """

    _packed: Tensor | None = None
    # (weight, its version, its storage) when packed: a changed weight drops the copy
    _packed_from: tuple = ()

    def _onednn_ok(self, x: Tensor) -> bool:
        return (
            _ONEDNN_LINEAR
            and self.weight.numel() >= _ONEDNN_MIN_WEIGHT
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )

    def pack(self, rows_hint: int = 32) -> bool:
        """Make the blocked copy of the weight; False where this layer never runs on oneDNN."""
        w = self.weight
        if not (
            _ONEDNN_LINEAR
            and w.numel() >= _ONEDNN_MIN_WEIGHT
            and w.dtype == torch.float32
            and w.device.type == "cpu"
        ):
            return False
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
        self._packed_from = stamp(w)
        return True

    @property
    def is_packed(self) -> bool:
        """Whether the layer holds a packed copy of its weight. A copy whose weight has changed
        since is dropped by the next forward that would have used it (one of several rows)."""
        return self._packed is not None

    def _packed_weight(self, x: Tensor) -> Tensor | None:
        if self._packed is None or x.numel() == x.shape[-1]:  # unpacked, or a single row
            return None
        if not is_current(self._packed_from, self.weight):
            self._packed, self._packed_from = None, ()  # the weight changed since: never use a stale copy
            return None
        return self._packed

    def _native_ok(self, x: Tensor) -> bool:
        """A single row, or a few rows of a small layer, in float32 on a CPU, for inference: our
        matrix-vector kernel (gpt.kernels), eagerly and inside torch.compile alike."""
        w, b = self.weight, self.bias
        if not (
            not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and x.device.type == "cpu"
            and w.is_contiguous()
            and (b is None or b.dtype == torch.float32)
            and kernels.f32_available()
        ):
            return False
        if step_rows.active():  # one sequence's rows (a draft being verified): as for one row
            return True
        big = w.numel() >= _ONEDNN_MIN_WEIGHT
        if torch.compiler.is_compiling() and not all(isinstance(d, int) for d in x.shape):
            # symbolic sizes: one row only, since a bound on the rows would become a guard, and
            # the graph compiled again when a batch crossed it
            return big and x.numel() == x.shape[-1]
        return 0 < x.numel() <= x.shape[-1] * (1 if big else _NATIVE_SMALL_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        if self._native_ok(x):
            y = torch.ops.gpt.gemv_f32(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self._onednn_ok(x):
            w = self._packed_weight(x)
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight if w is None else w, self.bias, "none", [None], ""
            )
        return F.linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module, rows_hint: int = 32) -> int:
    """Give every eligible linear layer of `model` its oneDNN-blocked weight (`Linear.pack`, and
    `gpt.quantization.Int8Linear.pack` for int8 layers); returns how many were packed. For
    inference on CPU with batches of several rows."""
    return sum(m.pack(rows_hint) for m in model.modules() if isinstance(m, (Linear, Int8Linear)))
