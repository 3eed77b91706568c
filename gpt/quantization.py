"""8-bit weights for inference: `gpt.quantize(model, "int8")`.

Every linear layer, the output head included, keeps its weight as int8 with one fp32 scale per
output channel (symmetric: w ~ scale * q, q in [-127, 127]). At each call the activations are
quantized the same way with one scale per row, the product runs as an int8 GEMM with int32
accumulation (our kernel in `gpt.kernels` on an x86 CPU, else `torch._int_mm`, the kernel
torchao's int8 dynamic path is built on), and the result is rescaled to floating point. Calls of
several rows can run on a prepacked copy of the weight instead (`Int8Linear.pack`), with the same numbers.

Why per row: a scale shared by the whole batch (what `quantized::linear_dynamic` does) lets one
row with large activations wipe out the precision of every other row in the batch, so a
request's output would depend on what else the server batched with it. Per row, the integer
product is exact, and a row's result is the same alone or in any batch.

The token embedding stays exact: a tied output head gets its own int8 copy of the embedding
matrix, and the lookup still reads the float table. Where `torch._int_mm` cannot run (a device
or build without it), the layer falls back to weight-only int8: the weight is dequantized to the
activations' dtype and multiplied in floating point.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import kernels, step_rows
from .kernels.reference import quantize_rows
from .packing import is_current, stamp

MODES = ("int8",)


def _int_mm_works(device: torch.device) -> bool:
    try:
        a = torch.ones(17, 32, dtype=torch.int8, device=device)
        b = torch.ones(24, 32, dtype=torch.int8, device=device)
        return bool(torch._int_mm(a, b.t())[0, 0] == 32)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_INT_MM: dict[str, bool] = {}


@kernels.machine_fact  # a fact about the build
def int_mm_available(device: torch.device) -> bool:
    """Whether this build can run int8 x int8 -> int32 GEMMs on `device` (checked once)."""
    key = str(device)
    if key not in _INT_MM:
        _INT_MM[key] = _int_mm_works(device)
    return _INT_MM[key]


def _qlinear_works() -> bool:
    """Whether oneDNN's int8 linear gives the exact products of our per-row quantized activations
    (uint8 with a zero point of 128) with int8 weights. Without VNNI (an AVX2-only CPU) it sums
    products in pairs into int16 (vpmaddubsw), which saturates on such values: 255 * 127 twice
    is past 32767, and the results come out wrong. The check uses such values."""
    try:
        w = torch.full((24, 32), 127, dtype=torch.int8)
        w[1::2] = -127
        packed = torch.ops.onednn.qlinear_prepack(w, [4, 32])
        x = torch.full((4, 32), 255, dtype=torch.uint8)  # 127 with the zero point of 128
        y = torch.ops.onednn.qlinear_pointwise(
            x,
            1.0,
            128,
            packed,
            torch.ones(24),
            torch.zeros(24, dtype=torch.long),
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return torch.equal(y, (127.0 * w.float().sum(1)).expand(4, 24))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_QLINEAR: list[bool] = []

# oneDNN's int8 call has a large fixed cost (the activations quantized and the products rescaled
# in tensor ops around it); ours grows with the rows from a small start. Up to these many rows,
# or multiply-adds, ours measured faster on every layer size tried, past them oneDNN's GEMM
# (docs/benchmarks.md, "Speculative decoding", this round's kernel changes).
_OURS_ROWS, _OURS_MACS = 16, 1 << 25


def ours_is_faster(rows: int, n: int, k: int) -> bool:
    return rows <= _OURS_ROWS or rows * n * k <= _OURS_MACS


@kernels.machine_fact  # a fact about the build and CPU
def qlinear_available() -> bool:
    """Whether this build has oneDNN's int8 linear with a prepacked weight (x86 CPU builds)."""
    if not _QLINEAR:
        _QLINEAR.append(_qlinear_works())
    return _QLINEAR[0]


def _resum_after_load(module: Int8Linear, incompatible_keys) -> None:  # a function, not a lambda: picklable
    module._sum_weights()


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel scales (inference only).

    `pack()` adds a copy of the weight in oneDNN's blocked layout for calls of several rows
    (batched decode steps, prefill). Given the plain layout, `torch._int_mm` re-lays the weight
    out on every such call; oneDNN's prepacked int8 linear (`onednn::qlinear_pointwise`, the
    kernel of PyTorch's x86 int8 inductor path) skips that. Its activations are uint8 with one
    zero point for the whole call, so each row is still quantized with its own scale (int8,
    shifted by 128) and the call runs with scale 1: it returns the exact integer products, and
    the rescaling after it is the same as `_int_mm`'s, so a row's result does not depend on
    which kernel ran or what it was batched with. A single row never uses the copy: it runs on
    our own kernel (`gpt.kernels`, with `weight_rows` and `weight_sum`), else `_int_mm`, with the
    same numbers again; so do calls of several rows on a CPU without VNNI, where no copy is made
    (oneDNN's int8 linear saturates there). The copy costs the weight's memory again: opt-in, like
    `gpt.linear.Linear.pack` (`gpt.pack_linear_weights(model)`; the server does it).
    """

    _packed: Tensor | None = None  # an opaque oneDNN tensor: never in the state dict
    _packed_from: tuple = ()  # (weight_q, its version, its storage) when packed
    _unit: tuple = ()  # the packed call's weight scales (ones) and zero points (zeros)
    _sum_from: tuple = ()  # (weight_q, its version, its storage) that weight_sum was summed from

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        # What our kernel reads (gpt/kernels/csrc/gemv.c says why): the weight in its own
        # layout and the rows' sums. Derived, so not saved, and made again whenever the weight
        # is loaded or changed; the copy costs the int8 weight's memory once more, on CPUs
        # where our kernel runs.
        empty = lambda dtype: torch.empty(0, dtype=dtype, device=weight_q.device)  # noqa: E731
        self.register_buffer("weight_sum", empty(torch.int32), persistent=False)
        self.register_buffer("weight_rows", empty(torch.int8), persistent=False)
        self._sum_weights()
        self.register_load_state_dict_post_hook(_resum_after_load)

    @torch.no_grad()
    def _sum_weights(self) -> None:
        """(Re)derive `weight_sum` and, where our kernel runs, `weight_rows` from `weight_q`."""
        w = self.weight_q
        derived = [("weight_sum", w.sum(dim=1, dtype=torch.int32))]
        if w.device.type == "cpu" and w.is_contiguous() and kernels.int8_available():
            derived.append(("weight_rows", kernels.interleave_int8(w)))
        for name, value in derived:
            if getattr(self, name).shape == value.shape:
                getattr(self, name).copy_(value)  # in place: a compiled graph holds on to this tensor
            else:
                setattr(self, name, value)
        self._sum_from = stamp(w)

    def _native_ok(self, x2: Tensor) -> bool:
        """Our kernel (gpt.kernels) runs calls of one row; calls of several where oneDNN's int8
        linear is inexact (no VNNI), since torch._int_mm is far slower there (docs/benchmarks.md,
        kernels table); and, eagerly, calls small enough that ours is faster (`ours_is_faster`).
        Larger ones run on oneDNN's GEMM. Both give the same numbers."""
        if x2.device.type != "cpu" or not self.weight_q.is_contiguous() or not kernels.int8_available():
            return False
        # the size last: under compile, a test of it would be a guard
        if (
            qlinear_available()
            and not step_rows.active()
            and x2.shape[0] != 1
            and (torch.compiler.is_compiling() or not ours_is_faster(x2.shape[0], *self.weight_q.shape))
        ):
            return False
        if not torch.compiler.is_compiling() and (
            not is_current(self._sum_from, self.weight_q) or self.weight_rows.shape != self.weight_q.shape
        ):
            self._sum_weights()  # written in place or moved since (a compiled step assumes frozen weights)
        return True

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        q, scale = quantize_rows(weight.detach())
        b = None if bias is None else bias.detach().clone()
        return cls(q, scale[:, 0].contiguous(), b)

    def dequantized_weight(self, dtype=torch.float32) -> Tensor:
        return self.weight_q.to(dtype) * self.weight_scale[:, None].to(dtype)

    def pack(self, rows_hint: int = 32) -> bool:
        """Make the blocked copy of the weight for calls of several rows; False where oneDNN's
        int8 linear is not available (then `_int_mm` runs every call)."""
        w = self.weight_q
        if w.device.type != "cpu" or not qlinear_available():
            return False
        self._packed = torch.ops.onednn.qlinear_prepack(w, [max(2, rows_hint), self.in_features])
        self._unit = (torch.ones(self.out_features), torch.zeros(self.out_features, dtype=torch.long))
        self._packed_from = stamp(w)
        return True

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    def _packed_weight(self, x2: Tensor) -> Tensor | None:
        if (
            self._packed is None
            or step_rows.active()  # one sequence's rows run on our kernel, as one row does
            or torch.compiler.is_compiling()
            or x2.shape[0] < 2
            or (kernels.int8_available() and ours_is_faster(x2.shape[0], *self.weight_q.shape))
        ):
            return None
        if not is_current(self._packed_from, self.weight_q):
            self._packed, self._packed_from = None, ()  # the weight changed since: never use a stale copy
            return None
        return self._packed

    def _packed_int_mm(self, packed: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """The exact integer products of x2's rows (quantized per row) with the weight, as
        float32 (M, N), and the rows' scales (M, 1)."""
        q, scale = quantize_rows(x2, torch.uint8)
        ones, zeros = self._unit
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return y, scale

    def forward(self, x: Tensor) -> Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        packed = self._packed_weight(x2)
        ours = packed is None and self._native_ok(x2)
        if ours and x2.dtype == torch.float32 and (self.bias is None or self.bias.dtype == torch.float32):
            y = torch.ops.gpt.linear_u8s8(x2, self.weight_rows, self.weight_sum, self.weight_scale, self.bias)
        elif ours or packed is not None or int_mm_available(x.device):
            if ours:
                q, s = quantize_rows(x2, torch.uint8)
                y = torch.ops.gpt.gemv_u8s8(q, self.weight_rows, self.weight_sum).float()
            elif packed is not None:
                y, s = self._packed_int_mm(packed, x2)
            else:
                q, s = quantize_rows(x2)
                y = torch._int_mm(q, self.weight_q.t()).float()
            y = y.mul_(s)
            y = (
                y.mul_(self.weight_scale)
                if self.bias is None
                else torch.addcmul(self.bias.float(), y, self.weight_scale)
            )
            y = y.to(x.dtype)
        else:
            w = self.weight_q.to(x.dtype)
            y = F.linear(x2, w) * self.weight_scale.to(x.dtype)
            if self.bias is not None:
                y += self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every linear layer of `model` (the output head too) by an int8 one, in place;
    returns the model in eval mode, ready for inference (it cannot be trained any more)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_float(m.weight, m.bias))
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
