"""The gpt:: operators: their schemas, and the shapes they return for tracing (torch.compile
calls them on fake tensors). Their CPU kernels are registered by gpt.kernels.loader, from the
C++ file (csrc/ops.cpp) or through ctypes; until then the ops exist but have no kernel, and
gpt.kernels routes no call to them."""

from __future__ import annotations

import torch
from torch import Tensor

LIBRARY = torch.library.Library("gpt", "DEF")
LIBRARY.define("gemv_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor")
LIBRARY.define("gemv_u8s8(Tensor x, Tensor w, Tensor w_sum) -> Tensor")
LIBRARY.define("linear_u8s8(Tensor x, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias) -> Tensor")
LIBRARY.define("argmax_rows(Tensor x) -> Tensor")
LIBRARY.define("logsumexp_rows(Tensor x) -> Tensor")
LIBRARY.define("gelu_tanh(Tensor x) -> Tensor")
LIBRARY.define("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor")
LIBRARY.define(
    "attend_one(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
    "Tensor pos) -> Tensor"
)
# the order in which gpt.kernels.ctypes_ops and gpt.kernels.reference.self_check take them
NAMES = (
    "gemv_f32",
    "gemv_u8s8",
    "linear_u8s8",
    "attend_one",
    "argmax_rows",
    "logsumexp_rows",
    "gelu_tanh",
    "gelu_tanh_backward",
)


@torch.library.register_fake("gpt::gemv_f32")
def _(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("gpt::gemv_u8s8")
def _(x: Tensor, w: Tensor, w_sum: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.int32)


@torch.library.register_fake("gpt::linear_u8s8")
def _(x: Tensor, w: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("gpt::argmax_rows")
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=torch.long)


@torch.library.register_fake("gpt::logsumexp_rows")
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0])


@torch.library.register_fake("gpt::gelu_tanh")
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("gpt::gelu_tanh_backward")
def _(grad: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # only x, as PyTorch's GELU: the backward recomputes the rest


def _gelu_backward(ctx, grad: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return torch.ops.gpt.gelu_tanh_backward(grad, x)


torch.library.register_autograd("gpt::gelu_tanh", _gelu_backward, setup_context=_gelu_setup)


@torch.library.register_fake("gpt::attend_one")
def _(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
    return torch.empty_like(q)
