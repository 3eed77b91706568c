"""The C library's kernels called through ctypes: loading it with its functions' argument
types, and Python functions of tensors around each kernel. They serve the self-check of a
freshly built library, and the gpt:: ops where no C++ compiler builds csrc/ops.cpp (or
`GPT_NATIVE_OPS=ctypes`), at the cost of a Python call and ctypes' argument conversion on every
call instead of the dispatcher's direct one."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor


def bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' arguments (pointers and sizes)."""
    lib = ctypes.CDLL(str(path))
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.gemv_isa.restype = ctypes.c_int
    lib.argmax_rows.argtypes = lib.logsumexp_rows.argtypes = [ptr, ptr, n, n]
    lib.argmax_rows.restype = lib.logsumexp_rows.restype = None
    lib.gelu_tanh_fwd.argtypes, lib.gelu_tanh_bwd.argtypes = [ptr, ptr, n], [ptr, ptr, ptr, n]
    lib.gelu_tanh_fwd.restype = lib.gelu_tanh_bwd.restype = None
    if hasattr(lib, "linear_u8s8"):
        lib.linear_u8s8.argtypes = [ptr] * 8 + [n, n, n]
        lib.linear_u8s8.restype = None
    for name in ("attend_one", "attend_one_f16"):
        if hasattr(lib, name):
            # q, k, v, k_cache, v_cache; the cache's strides; rows, pos, out; B, H, D; the scale
            getattr(lib, name).argtypes = [ptr] * 5 + [n] * 3 + [ptr] * 3 + [n] * 3 + [ctypes.c_float]
            getattr(lib, name).restype = None
    if hasattr(lib, "i8_interleave"):
        lib.i8_interleave.argtypes = [ptr, ptr, n, n]
        lib.i8_interleave.restype = None
    for name in ("gemv_f32", "gemv_u8s8"):
        if hasattr(lib, name):  # a flavour without a kernel for one of them leaves it out
            getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, n, n, n]
            getattr(lib, name).restype = None
    return lib


def ops(lib: ctypes.CDLL) -> tuple:
    """The library's kernels as Python functions of tensors, in the order of gpt.kernels.ops.NAMES."""
    return (
        functools.partial(_gemv_f32, lib),
        functools.partial(_gemv_u8s8, lib),
        functools.partial(_linear_u8s8, lib),
        functools.partial(_attend, lib),
        functools.partial(_argmax_rows, lib),
        functools.partial(_logsumexp_rows, lib),
        functools.partial(_gelu_tanh, lib),
        functools.partial(_gelu_tanh_backward, lib),
    )


def interleave(lib: ctypes.CDLL, w: Tensor) -> Tensor:
    """The int8 weight (N, K) laid out as `lib`'s int8 kernel reads it (gpt.kernels.interleave_int8)."""
    w = w.contiguous()
    out = torch.empty_like(w)
    lib.i8_interleave(w.data_ptr(), out.data_ptr(), *w.shape)
    return out


def _gemv_f32(lib: ctypes.CDLL, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ w (N, K).T + bias, float32, contiguous."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)
    lib.gemv_f32(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K)
    return y


def _gemv_u8s8(lib: ctypes.CDLL, x: Tensor, w: Tensor, w_sum: Tensor) -> Tensor:
    """The exact int32 products of (x - 128) (M, K) and the weight (N, K).T, given as w in the
    kernel's layout (`interleave`); w_sum = the weight's row sums as int32."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N, dtype=torch.int32)
    lib.gemv_u8s8(x.data_ptr(), w.data_ptr(), w_sum.data_ptr(), y.data_ptr(), M, N, K)
    return y


def _linear_u8s8(
    lib: ctypes.CDLL, x: Tensor, w: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """x (M, K) float32 through the int8 layer whose weight is w (`interleave`'s layout), w_sum
    its row sums and w_scale (N) its scales: gpt.kernels.reference.linear_u8s8_reference, in one call."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y, xq, xs = x.new_empty(M, N), x.new_empty(M, K, dtype=torch.uint8), x.new_empty(M)
    ptrs = (x, w, w_sum, w_scale, bias, y, xq, xs)
    lib.linear_u8s8(*(None if t is None else t.data_ptr() for t in ptrs), M, N, K)
    return y


def _argmax_rows(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x (B, V) float32 -> (B,) int64: torch.argmax(x, -1) (csrc/rows.c)."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), out.data_ptr(), *x.shape)
    return out


def _logsumexp_rows(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x (B, V) float32 -> (B,): torch.logsumexp(x, -1) within float32 rounding (csrc/rows.c)."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0])
    lib.logsumexp_rows(x.data_ptr(), out.data_ptr(), *x.shape)
    return out


def _gelu_tanh(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x float32 -> F.gelu(x, approximate="tanh") within float32 rounding (csrc/gelu.c)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.gelu_tanh_fwd(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def _gelu_tanh_backward(lib: ctypes.CDLL, grad: Tensor, x: Tensor) -> Tensor:
    """The gradient of _gelu_tanh at x times `grad` (csrc/gelu.c)."""
    x, grad = x.contiguous(), grad.contiguous()
    out = torch.empty_like(x)
    lib.gelu_tanh_bwd(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel())
    return out


def _attend(
    lib: ctypes.CDLL,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    pos: Tensor,
) -> Tensor:
    """One query per (row, head), q (B, H, D) float32: see csrc/attention.c."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rows, pos = rows.contiguous().long(), pos.contiguous().long()
    (B, H, D), (s_row, s_head, s_pos, s_d) = q.shape, k_cache.stride()
    assert s_d == 1 and v_cache.stride() == k_cache.stride()
    out = q.new_empty(B, H, D)
    kernel = lib.attend_one
    if k_cache.dtype == torch.float16:
        assert hasattr(lib, "attend_one_f16") and D % 8 == 0 and D <= 256 and v_cache.dtype == torch.float16
        kernel = lib.attend_one_f16
    tensors = (q, k, v, k_cache, v_cache)
    kernel(
        *(t.data_ptr() for t in tensors),
        s_row,
        s_head,
        s_pos,
        rows.data_ptr(),
        pos.data_ptr(),
        out.data_ptr(),
        B,
        H,
        D,
        D**-0.5,
    )
    return out
