"""Our own CPU kernels for the decode step: matrix-vector products for one stream
(`csrc/gemv.c`), one-query attention for any batch (`csrc/attention.c`) and the row-wise argmax
and logsumexp of sampling (`csrc/rows.c`); and for training, GPT-2's GELU and its derivative
(`csrc/gelu.c`, used by gpt.activations). This module is what callers use: whether each kernel
runs here, and `argmax`/`logsumexp`, which pick ours or PyTorch's.

A one-stream decode step multiplies one activation row by every weight matrix: its time is the
time to read the weights. PyTorch's CPU kernels for one row read them at well below the memory
bandwidth that a plain vector loop reaches (its oneDNN, MKL and int8 `_int_mm` GEMMs are built
for matrices, not for one row). The maintained int8 route, torchao, ends in those same kernels
on an x86 CPU (`_int_mm` or oneDNN's int8 linear for int8 activations, `_weight_int8pack_mm`
for weight-only int8), and we found no library with a faster single-row product for PyTorch
tensors; `benchmarks/native_kernels.py` measures the difference on the machine at hand. So a
small C file of our own, behind `torch.ops.gpt.gemv_f32` and `torch.ops.gpt.gemv_u8s8`, serves
`gpt.linear.Linear` and `gpt.quantization.Int8Linear` for single rows; calls of several rows
stay on oneDNN's packed kernels, which are faster there (int8: where oneDNN's kernel is exact;
gpt.quantization). The int8 kernel reads the weight in a layout of its own (`interleave_int8`).
`torch.ops.gpt.linear_u8s8` is the whole int8 layer in one call (quantize the rows, multiply,
rescale, add the bias): as a dozen small tensor operations instead, each paying the eager
dispatcher's cost, that work weighs on a decode step next to the products themselves.

The decode step's attention has one query per row. PyTorch's CPU attention tiles queries and,
with one, reads the cache well below the memory bandwidth, a large share of a batched step.
`torch.ops.gpt.attend_one` writes each row's new key and value into the cache and attends to
that row's own positions in one pass (`gpt.attention.Attention`, float32), from a float32 cache
or, where the CPU converts halves (F16C), a float16 one: half the bytes.

The pieces: `ops` declares the gpt:: operators; `build` compiles the C sources (`csrc/`) for
this machine; `loader` builds, registers and checks them on first use, the registered kernels
coming from `csrc/ops.cpp` (built against this PyTorch's headers with the system's C++
compiler, once, and called by the dispatcher directly) or, without a C++ compiler (or with
`GPT_NATIVE_OPS=ctypes`), from `ctypes_ops`, which call the same C library with a Python call's
overhead on each of a decode step's many calls; `reference` holds what each kernel computes,
written in PyTorch, and the self-check against it.

The C files are compiled on first use with the system's C compiler (`$CC`, else `cc`) for this
CPU (`-march=native`: AVX-512 VNNI, AVX-VNNI or AVX2, whichever it has) into a cache directory
(`$GPT_KERNEL_CACHE`, else `~/.cache/gpt-serve/kernels`), keyed by the source, the compiler and
the CPU's flags, and written atomically. The library links to the OpenMP runtime that PyTorch
has already loaded, so both share one pool of threads and `torch.set_num_threads`. Where
anything is missing (no compiler, not x86-64 Linux, no AVX2, a failed self-check) PyTorch's
kernels run as before; `GPT_NATIVE_KERNELS=0` turns ours off. `status()` says which is in use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import ctypes_ops, loader

_INT8_FLAVOURS = {1: "avx512-vnni", 2: "avx-vnni", 3: "avx2"}


def machine_fact(fn):
    """`torch.compiler.assume_constant_result`: a fact about this machine, which torch.compile
    need not trace. That function imports all of dynamo first, about half of `import gpt`'s
    time, which every command and server would pay at start-up; the mark it leaves is set here
    instead (tests/gpt/kernels/test_loading.py checks that it is the same mark)."""
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _isa() -> int:
    lib = loader.library()
    return lib.gemv_isa() if lib is not None else 0


@machine_fact
def f32_available() -> bool:
    """Whether `torch.ops.gpt.gemv_f32` runs our kernel here (builds it on the first call)."""
    return bool(_isa() & 1)


@machine_fact
def int8_available() -> bool:
    """Whether `torch.ops.gpt.gemv_u8s8` runs our kernel here (builds it on the first call)."""
    return bool(_isa() >> 4)


@machine_fact
def rows_available() -> bool:
    """Whether `torch.ops.gpt.argmax_rows` and `logsumexp_rows` run our kernels here."""
    return _isa() != 0


@machine_fact
def gelu_available() -> bool:
    """Whether `torch.ops.gpt.gelu_tanh` and its backward run our kernels here."""
    return _isa() != 0


@machine_fact
def attention_available() -> bool:
    """Whether `torch.ops.gpt.attend_one` runs our kernel here (builds it on the first call)."""
    return _isa() != 0


@machine_fact
def attention_f16_available() -> bool:
    """Whether `torch.ops.gpt.attend_one` also takes a float16 cache here (AVX2 with F16C)."""
    lib = loader.library()
    return lib is not None and hasattr(lib, "attend_one_f16")


def status() -> str:
    """One line for logs: which kernels run single-row products, or why ours do not."""
    isa = _isa()
    if not isa:
        return f"PyTorch's ({loader.not_built})"
    return (
        f"native (float32: {'yes' if isa & 1 else 'no'}, int8: {_INT8_FLAVOURS.get(isa >> 4, 'no')}, "
        f"attention: yes{' (float16 cache too)' if attention_f16_available() else ''}; "
        f"called through {loader.registered})"
    )


def interleave_int8(w: Tensor) -> Tensor:
    """A copy of the int8 weight `w` (N, K) in the layout `torch.ops.gpt.gemv_u8s8` reads: the
    rows of each block of four interleaved in chunks of one vector (csrc/gemv.c says why).
    The layout depends on this CPU's vector width; only where `int8_available()`."""
    if not int8_available():
        raise RuntimeError("our int8 kernel is not in use here: " + status())
    return ctypes_ops.interleave(loader.library(), w)


def _rows_kernel_fits(x: Tensor) -> bool:
    return (
        x.dim() == 2
        and x.shape[1] > 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and rows_available()
    )


def argmax(x: Tensor) -> Tensor:
    """torch.argmax(x, dim=-1) of a 2-D tensor, on our kernel where it runs (float32 on a CPU)."""
    if _rows_kernel_fits(x):
        return torch.ops.gpt.argmax_rows(x)
    return x.argmax(dim=-1)


def logsumexp(x: Tensor) -> Tensor:
    """torch.logsumexp(x, dim=-1) of a 2-D tensor, on our kernel where it runs (float32 on a CPU)."""
    if _rows_kernel_fits(x):
        return torch.ops.gpt.logsumexp_rows(x)
    return torch.logsumexp(x, dim=-1)
