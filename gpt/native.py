"""Our own CPU kernels for the decode step: matrix-vector products for one stream
(`gpt/csrc/gemv.c`) and one-query attention for any batch (`gpt/csrc/attention.c`).

A one-stream decode step multiplies one activation row by every weight matrix: its time is the
time to read the weights. PyTorch's CPU kernels for one row read them at well below the memory
bandwidth that a plain vector loop reaches (its oneDNN, MKL and int8 `_int_mm` GEMMs are built
for matrices, not for one row). The maintained int8 route, torchao, ends in those same kernels
on an x86 CPU (`_int_mm` or oneDNN's int8 linear for int8 activations, `_weight_int8pack_mm`
for weight-only int8, which measured slower still), and we found no library with a faster
single-row product for PyTorch tensors; `benchmarks/native_kernels.py` measures the difference
on the machine at hand. So a small C file of our own, behind `torch.ops.gpt.gemv_f32` and
`torch.ops.gpt.gemv_u8s8`, serves `gpt.layers.Linear` and
`gpt.quantization.Int8Linear` for single rows; calls of several rows stay on oneDNN's packed
kernels, which are faster there (int8: where oneDNN's kernel is exact; gpt.quantization). The
int8 kernel reads the weight in a layout of its own (`interleave_int8`). `torch.ops.gpt.linear_u8s8`
is the whole int8 layer in one call (quantize the rows, multiply, rescale, add the bias): done
as a dozen small tensor operations instead, that work cost an eager decode step about as much as
the products themselves (benchmarks/native_kernels.py shows the step).

The decode step's attention has one query per row. PyTorch's CPU attention tiles queries and,
with one, reads the cache well below the memory bandwidth; at a batch of 32 it was about half
of a GPT-2-small step. `torch.ops.gpt.attend_one` writes each row's new key and value into the
cache and attends to that row's own positions in one pass (`gpt.layers.Attention`, float32),
from a float32 cache or, where the CPU converts halves (F16C), a float16 one: half the bytes.

The ops reach the kernels through `gpt/csrc/ops.cpp`, built against this PyTorch's headers with
the system's C++ compiler (about ten seconds, once): a call then costs about two microseconds
through the dispatcher. Without a C++ compiler (or with `GPT_NATIVE_OPS=ctypes`) they are Python
functions calling the same C library through ctypes, several microseconds a call, which a
GPT-2-small decode step pays 61 times.

The C files are compiled on first use with the system's C compiler (`$CC`, else `cc`) for this
CPU (`-march=native`: AVX-512 VNNI, AVX-VNNI or AVX2, whichever it has) into a cache directory
(`$GPT_KERNEL_CACHE`, else `~/.cache/gpt-serve/kernels`), keyed by the source, the compiler and
the CPU's flags, and written atomically. The library links to the OpenMP runtime that PyTorch
has already loaded, so both share one pool of threads and `torch.set_num_threads`. Where
anything is missing (no compiler, not x86-64 Linux, no AVX2, a failed self-check) PyTorch's
kernels run as before; `GPT_NATIVE_KERNELS=0` turns ours off. `status()` says which is in use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from .native_build import _compile, _compile_ops
from .row_quantization import quantize_rows

log = logging.getLogger(__name__)

_INT8_FLAVOURS = {1: "avx512-vnni", 2: "avx-vnni", 3: "avx2"}
_NOT_BUILT = ""  # why the kernels are not in use, once known


def _self_check(
    isa: int, lib: ctypes.CDLL, gemv_f32, gemv_u8s8, linear_u8s8, attend, argmax_rows, logsumexp_rows
) -> None:
    """The kernels of `lib`, reached through the given callables (its ctypes wrappers, or the
    registered torch ops), against PyTorch on awkward shapes: a short last block, a K tail;
    rows out of order in a strided cache, each of its own length."""
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(2, 5, 3, 12, 8, generator=g).unbind(0)  # (rows, heads, positions, D)
    q, k, v = torch.randn(3, 2, 3, 8, generator=g).unbind(0)
    rows, pos = torch.tensor([3, 1]), torch.tensor([0, 6])
    want = _attend_reference(q, k, v, kc.clone(), vc.clone(), rows, pos)
    if not torch.allclose(attend(q, k, v, kc, vc, rows, pos), want, atol=1e-5, rtol=1e-5):
        raise RuntimeError("attention kernel disagrees with torch")
    if hasattr(lib, "attend_one_f16"):
        kc, vc = (c.half() for c in torch.randn(2, 5, 3, 12, 16, generator=g).unbind(0))
        q, k, v = torch.randn(3, 2, 3, 16, generator=g).unbind(0)
        want = _attend_reference(q, k, v, kc.clone(), vc.clone(), rows, pos)
        got = attend(q, k, v, kc, vc, rows, pos)
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4) or not torch.equal(kc[rows, :, pos], k.half()):
            raise RuntimeError("float16-cache attention kernel disagrees with torch")
    logits = torch.randn(4, 1001, generator=g) * 10
    logits[1, 5:] = logits[1, 3]  # ties: the first one wins
    logits[2, :] = -float("inf")
    logits[2, 7] = 1.0
    logits[3, 9] = float("nan")
    if not torch.equal(argmax_rows(logits), logits.argmax(-1)):
        raise RuntimeError("argmax kernel disagrees with torch")
    if not torch.allclose(
        logsumexp_rows(logits), torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-6, equal_nan=True
    ):
        raise RuntimeError("logsumexp kernel disagrees with torch")
    for M, N, K in [(1, 7, 5), (1, 37, 200), (3, 9, 130)]:
        if isa & 1:
            x, w, b = (
                torch.randn(M, K, generator=g),
                torch.randn(N, K, generator=g),
                torch.randn(N, generator=g),
            )
            if not torch.allclose(
                gemv_f32(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4
            ):
                raise RuntimeError("float32 kernel disagrees with torch")
        if isa >> 4:
            xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
            w8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
            y8 = gemv_u8s8(
                (xq.int() + 128).to(torch.uint8), _interleave(lib, w8), w8.sum(1, dtype=torch.int32)
            )
            if not torch.equal(y8.long(), xq.long() @ w8.long().t()):
                raise RuntimeError("int8 kernel disagrees with torch")
            x, ws, b = torch.randn(M, K, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
            if not torch.equal(
                linear_u8s8(x, _interleave(lib, w8), w8.sum(1, dtype=torch.int32), ws, b),
                _linear_u8s8_reference(x, w8, ws, b),
            ):
                raise RuntimeError("int8 linear kernel disagrees with torch")


_OP_NAMES = ("gemv_f32", "gemv_u8s8", "linear_u8s8", "attend_one", "argmax_rows", "logsumexp_rows")


def _ctypes_ops(lib: ctypes.CDLL) -> tuple:
    """The library's kernels as Python functions of tensors, in the order of _OP_NAMES."""
    return (
        functools.partial(_gemv_f32, lib),
        functools.partial(_gemv_u8s8, lib),
        functools.partial(_linear_u8s8, lib),
        functools.partial(_attend, lib),
        functools.partial(_argmax_rows, lib),
        functools.partial(_logsumexp_rows, lib),
    )


def _bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' arguments (pointers and sizes)."""
    lib = ctypes.CDLL(str(path))
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.gemv_isa.restype = ctypes.c_int
    lib.argmax_rows.argtypes = lib.logsumexp_rows.argtypes = [ptr, ptr, n, n]
    lib.argmax_rows.restype = lib.logsumexp_rows.restype = None
    if hasattr(lib, "linear_u8s8"):
        lib.linear_u8s8.argtypes = [ptr] * 8 + [n, n, n]
        lib.linear_u8s8.restype = None
    for name in ("attend_one", "attend_one_f16"):
        if hasattr(lib, name):
            getattr(lib, name).argtypes = [
                ptr,
                ptr,
                ptr,
                ptr,
                ptr,
                n,
                n,
                n,
                ptr,
                ptr,
                ptr,
                n,
                n,
                n,
                ctypes.c_float,
            ]
            getattr(lib, name).restype = None
    if hasattr(lib, "i8_interleave"):
        lib.i8_interleave.argtypes = [ptr, ptr, n, n]
        lib.i8_interleave.restype = None
    for name in ("gemv_f32", "gemv_u8s8"):
        if hasattr(lib, name):  # a flavour without a kernel for one of them leaves it out
            getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, n, n, n]
            getattr(lib, name).restype = None
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _NOT_BUILT
    try:
        if os.environ.get("GPT_NATIVE_KERNELS", "1") == "0":
            raise RuntimeError("turned off by GPT_NATIVE_KERNELS=0")
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"built only for x86-64 Linux, not {platform.system()} {platform.machine()}")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (cc) found")
        lib = _bind(_compile(cc))
        isa = lib.gemv_isa()
        if isa == 0:
            raise RuntimeError("this CPU has neither AVX2 nor AVX-512")
        _register_kernels(lib, isa)  # and checks them
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _NOT_BUILT = str(e)
        log.info("native decode kernels not in use (%s): PyTorch's kernels run instead", e)
        return None


_REGISTERED = ""  # how the gpt:: ops reach the kernels: "C++" or "ctypes"


def _register_kernels(lib: ctypes.CDLL, isa: int) -> None:
    """Give the gpt:: ops their CPU kernels: `ops.cpp`'s where a C++ compiler builds it against
    this PyTorch (about two microseconds a call), else the library's through ctypes (several);
    then check them once, as registered."""
    global _REGISTERED
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if os.environ.get("GPT_NATIVE_OPS") == "ctypes":
            raise RuntimeError("GPT_NATIVE_OPS=ctypes")
        if not cxx:
            raise RuntimeError("no C++ compiler (c++) found")
        torch.ops.load_library(str(_compile_ops(cxx)))
        _REGISTERED = "C++"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("gpt:: ops through ctypes (%s)", e)
        for name, fn in zip(_OP_NAMES, _ctypes_ops(lib)):
            _ops.impl(name, fn, "CPU")
        _REGISTERED = "ctypes"
    _self_check(isa, lib, *(getattr(torch.ops.gpt, name) for name in _OP_NAMES))


@functools.cache
def _isa() -> int:
    lib = _library()
    return lib.gemv_isa() if lib is not None else 0


@torch.compiler.assume_constant_result  # a fact about this machine: torch.compile need not trace it
def f32_available() -> bool:
    """Whether `torch.ops.gpt.gemv_f32` runs our kernel here (builds it on the first call)."""
    return bool(_isa() & 1)


@torch.compiler.assume_constant_result
def int8_available() -> bool:
    """Whether `torch.ops.gpt.gemv_u8s8` runs our kernel here (builds it on the first call)."""
    return bool(_isa() >> 4)


@torch.compiler.assume_constant_result
def rows_available() -> bool:
    """Whether `torch.ops.gpt.argmax_rows` and `logsumexp_rows` run our kernels here."""
    return _isa() != 0


@torch.compiler.assume_constant_result
def attention_available() -> bool:
    """Whether `torch.ops.gpt.attend_one` runs our kernel here (builds it on the first call)."""
    return _isa() != 0


@torch.compiler.assume_constant_result
def attention_f16_available() -> bool:
    """Whether `torch.ops.gpt.attend_one` also takes a float16 cache here (AVX2 with F16C)."""
    lib = _library()
    return lib is not None and hasattr(lib, "attend_one_f16")


def status() -> str:
    """One line for logs: which kernels run single-row products, or why ours do not."""
    isa = _isa()
    if not isa:
        return f"PyTorch's ({_NOT_BUILT})"
    return (
        f"native (float32: {'yes' if isa & 1 else 'no'}, int8: {_INT8_FLAVOURS.get(isa >> 4, 'no')}, "
        f"attention: yes{' (float16 cache too)' if attention_f16_available() else ''}; "
        f"called through {_REGISTERED})"
    )


_ops = torch.library.Library("gpt", "DEF")
_ops.define("gemv_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor")
_ops.define("gemv_u8s8(Tensor x, Tensor w, Tensor w_sum) -> Tensor")
_ops.define("linear_u8s8(Tensor x, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias) -> Tensor")
_ops.define("argmax_rows(Tensor x) -> Tensor")
_ops.define("logsumexp_rows(Tensor x) -> Tensor")
_ops.define(
    "attend_one(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
    "Tensor pos) -> Tensor"
)


def _gemv_f32(lib: ctypes.CDLL, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ w (N, K).T + bias, float32, contiguous."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)
    lib.gemv_f32(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K)
    return y


def _interleave(lib: ctypes.CDLL, w: Tensor) -> Tensor:
    """The int8 weight (N, K) laid out as `lib`'s int8 kernel reads it (`interleave_int8`)."""
    w = w.contiguous()
    out = torch.empty_like(w)
    lib.i8_interleave(w.data_ptr(), out.data_ptr(), *w.shape)
    return out


def interleave_int8(w: Tensor) -> Tensor:
    """A copy of the int8 weight `w` (N, K) in the layout `torch.ops.gpt.gemv_u8s8` reads: the
    rows of each block of four interleaved in chunks of one vector (gpt/csrc/gemv.c says why).
    The layout depends on this CPU's vector width; only where `int8_available()`."""
    if not int8_available():
        raise RuntimeError("our int8 kernel is not in use here: " + status())
    return _interleave(_library(), w)


def _gemv_u8s8(lib: ctypes.CDLL, x: Tensor, w: Tensor, w_sum: Tensor) -> Tensor:
    """The exact int32 products of (x - 128) (M, K) and the weight (N, K).T, given as w in the
    kernel's layout (`interleave_int8`); w_sum = the weight's row sums as int32."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N, dtype=torch.int32)
    lib.gemv_u8s8(x.data_ptr(), w.data_ptr(), w_sum.data_ptr(), y.data_ptr(), M, N, K)
    return y


def _linear_u8s8(
    lib: ctypes.CDLL, x: Tensor, w: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """x (M, K) float32 through the int8 layer whose weight is w (`interleave_int8`'s layout),
    w_sum its row sums and w_scale (N) its scales: `_linear_u8s8_reference`, in one call."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y, xq, xs = x.new_empty(M, N), x.new_empty(M, K, dtype=torch.uint8), x.new_empty(M)
    lib.linear_u8s8(
        x.data_ptr(),
        w.data_ptr(),
        w_sum.data_ptr(),
        w_scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        xq.data_ptr(),
        xs.data_ptr(),
        M,
        N,
        K,
    )
    return y


def _linear_u8s8_reference(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """What `linear_u8s8` computes, in PyTorch, with w in the plain layout: x quantized per row
    (gpt.quantization.quantize_rows), the exact integer products, rescaled as Int8Linear does."""
    q, s = quantize_rows(x)
    y = (q.long() @ w.long().t()).float().mul_(s)
    return y.mul_(w_scale) if bias is None else torch.addcmul(bias, y, w_scale)


def _argmax_rows(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x (B, V) float32 -> (B,) int64: torch.argmax(x, -1) (gpt/csrc/rows.c)."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), out.data_ptr(), *x.shape)
    return out


def _logsumexp_rows(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x (B, V) float32 -> (B,): torch.logsumexp(x, -1) within float32 rounding (gpt/csrc/rows.c)."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0])
    lib.logsumexp_rows(x.data_ptr(), out.data_ptr(), *x.shape)
    return out


def argmax(x: Tensor) -> Tensor:
    """torch.argmax(x, dim=-1) of a 2-D tensor, on our kernel where it runs (float32 on a CPU)."""
    if (
        x.dim() == 2
        and x.shape[1] > 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and rows_available()
    ):
        return torch.ops.gpt.argmax_rows(x)
    return x.argmax(dim=-1)


def logsumexp(x: Tensor) -> Tensor:
    """torch.logsumexp(x, dim=-1) of a 2-D tensor, on our kernel where it runs (float32 on a CPU)."""
    if (
        x.dim() == 2
        and x.shape[1] > 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and rows_available()
    ):
        return torch.ops.gpt.logsumexp_rows(x)
    return torch.logsumexp(x, dim=-1)


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
    """One query per (row, head), q (B, H, D) float32: see gpt/csrc/attention.c."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rows, pos = rows.contiguous().long(), pos.contiguous().long()
    (B, H, D), (s_row, s_head, s_pos, s_d) = q.shape, k_cache.stride()
    assert s_d == 1 and v_cache.stride() == k_cache.stride()
    out = q.new_empty(B, H, D)
    kernel = lib.attend_one
    if k_cache.dtype == torch.float16:
        assert hasattr(lib, "attend_one_f16") and D % 8 == 0 and D <= 256 and v_cache.dtype == torch.float16
        kernel = lib.attend_one_f16
    kernel(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
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


def _attend_reference(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor
) -> Tensor:
    """What `attend_one` computes, in PyTorch: write each row's k, v (B, H, D) at pos[b] of cache
    row rows[b], then attend with q (B, H, D) to that row's positions 0..pos[b]."""
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    n = int(pos.max()) + 1
    mask = (torch.arange(n)[None, :] <= pos[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_cache[rows, :, :n].to(q.dtype), v_cache[rows, :, :n].to(q.dtype), attn_mask=mask
    )[:, :, 0]


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


@torch.library.register_fake("gpt::attend_one")
def _(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
    return torch.empty_like(q)
