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
cache and attends to that row's own positions in one pass (`gpt.layers.Attention`, float32).

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
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gemv.c", "attention.c")]
OPS_SOURCE = Path(__file__).with_name("csrc") / "ops.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_INT8_FLAVOURS = {1: "avx512-vnni", 2: "avx-vnni", 3: "avx2"}
_NOT_BUILT = ""  # why the kernels are not in use, once known


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("GPT_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-serve" / "kernels"


def _build(name: str, compiler: str, args: list[str], key_parts: list[str], timeout: float) -> Path:
    """`compiler *args -o <library>`, cached under a key of the sources, compiler, flags and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*key_parts, compiler, version, " ".join(args), _cpu_flags()]).encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # another process may be building it too
    os.close(fd)
    try:
        done = subprocess.run([compiler, *args, "-o", tmp], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compile(cc: str) -> Path:
    """The C kernels' shared library for this compiler and CPU: from the cache, or built now."""
    return _build("gemv", cc, [*FLAGS, *map(str, SOURCES)], [s.read_text() for s in SOURCES], 120)


def _compile_ops(cxx: str) -> Path:
    """The C kernels and `ops.cpp`, which registers them as the gpt:: ops' CPU kernels, linked
    against this PyTorch (its headers come with every wheel)."""
    from torch.utils import cpp_extension

    lib_dirs = cpp_extension.library_paths()
    args = [*FLAGS, "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{d}" for d in cpp_extension.include_paths()),
            # "-x c" before each C file: GCC's C++ driver compiled a second C file as C++ otherwise
            *(arg for source in SOURCES for arg in ("-x", "c", str(source))), "-x", "c++", str(OPS_SOURCE), "-x", "none",
            *(f"-L{d}" for d in lib_dirs), *(f"-Wl,-rpath,{d}" for d in lib_dirs), "-lc10", "-ltorch_cpu"]
    return _build("ops", cxx, args, [s.read_text() for s in (*SOURCES, OPS_SOURCE)] + [torch.__version__], 300)


def _self_check(isa: int, lib: ctypes.CDLL, gemv_f32, gemv_u8s8, linear_u8s8, attend) -> None:
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
    for M, N, K in [(1, 7, 5), (1, 37, 200), (3, 9, 130)]:
        if isa & 1:
            x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
            if not torch.allclose(gemv_f32(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4):
                raise RuntimeError("float32 kernel disagrees with torch")
        if isa >> 4:
            xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
            w8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
            y8 = gemv_u8s8((xq.int() + 128).to(torch.uint8), _interleave(lib, w8), w8.sum(1, dtype=torch.int32))
            if not torch.equal(y8.long(), xq.long() @ w8.long().t()):
                raise RuntimeError("int8 kernel disagrees with torch")
            x, ws, b = torch.randn(M, K, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
            if not torch.equal(linear_u8s8(x, _interleave(lib, w8), w8.sum(1, dtype=torch.int32), ws, b),
                               _linear_u8s8_reference(x, w8, ws, b)):
                raise RuntimeError("int8 linear kernel disagrees with torch")


def _ctypes_ops(lib: ctypes.CDLL) -> tuple:
    """The library's kernels as Python functions of tensors: gemv_f32, gemv_u8s8, linear_u8s8, attend."""
    return (functools.partial(_gemv_f32, lib), functools.partial(_gemv_u8s8, lib), functools.partial(_linear_u8s8, lib),
            functools.partial(_attend, lib))


def _bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' arguments (pointers and sizes)."""
    lib = ctypes.CDLL(str(path))
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.gemv_isa.restype = ctypes.c_int
    if hasattr(lib, "linear_u8s8"):
        lib.linear_u8s8.argtypes = [ptr] * 8 + [n, n, n]
        lib.linear_u8s8.restype = None
    lib.attend_one.argtypes = [ptr, ptr, ptr, ptr, ptr, n, n, n, ptr, ptr, ptr, n, n, n, ctypes.c_float]
    lib.attend_one.restype = None
    if hasattr(lib, "i8_interleave"):
        lib.i8_interleave.argtypes = [ptr, ptr, n, n]
        lib.i8_interleave.restype = None
    for name in ("gemv_f32", "gemv_u8s8"):
        if hasattr(lib, name):  # a flavour without a kernel for one of them leaves it out
            getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, n, n, n]
            getattr(lib, name).restype = None
    return lib


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
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
        for name, fn in zip(("gemv_f32", "gemv_u8s8", "linear_u8s8", "attend_one"), _ctypes_ops(lib)):
            _ops.impl(name, fn, "CPU")
        _REGISTERED = "ctypes"
    _self_check(isa, lib, torch.ops.gpt.gemv_f32, torch.ops.gpt.gemv_u8s8, torch.ops.gpt.linear_u8s8,
                torch.ops.gpt.attend_one)


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
def attention_available() -> bool:
    """Whether `torch.ops.gpt.attend_one` runs our kernel here (builds it on the first call)."""
    return _isa() != 0


def status() -> str:
    """One line for logs: which kernels run single-row products, or why ours do not."""
    isa = _isa()
    if not isa:
        return f"PyTorch's ({_NOT_BUILT})"
    return (f"native (float32: {'yes' if isa & 1 else 'no'}, int8: {_INT8_FLAVOURS.get(isa >> 4, 'no')}, "
            f"attention: yes; called through {_REGISTERED})")


_ops = torch.library.Library("gpt", "DEF")
_ops.define("gemv_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor")
_ops.define("gemv_u8s8(Tensor x, Tensor w, Tensor w_sum) -> Tensor")
_ops.define("linear_u8s8(Tensor x, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias) -> Tensor")
_ops.define("attend_one(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
            "Tensor pos) -> Tensor")


def _gemv_f32(lib: ctypes.CDLL, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
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


def _linear_u8s8(lib: ctypes.CDLL, x: Tensor, w: Tensor, w_sum: Tensor, w_scale: Tensor,
                 bias: Optional[Tensor]) -> Tensor:
    """x (M, K) float32 through the int8 layer whose weight is w (`interleave_int8`'s layout),
    w_sum its row sums and w_scale (N) its scales: `_linear_u8s8_reference`, in one call."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y, xq, xs = x.new_empty(M, N), x.new_empty(M, K, dtype=torch.uint8), x.new_empty(M)
    lib.linear_u8s8(x.data_ptr(), w.data_ptr(), w_sum.data_ptr(), w_scale.data_ptr(),
                    None if bias is None else bias.data_ptr(), y.data_ptr(), xq.data_ptr(), xs.data_ptr(), M, N, K)
    return y


def _linear_u8s8_reference(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """What `linear_u8s8` computes, in PyTorch, with w in the plain layout: x quantized per row
    (gpt.quantization.quantize_rows), the exact integer products, rescaled as Int8Linear does."""
    from .quantization import quantize_rows  # gpt.quantization imports this module

    q, s = quantize_rows(x)
    y = (q.long() @ w.long().t()).float().mul_(s)
    return y.mul_(w_scale) if bias is None else torch.addcmul(bias, y, w_scale)


def _attend(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
            pos: Tensor) -> Tensor:
    """One query per (row, head), q (B, H, D) float32: see gpt/csrc/attention.c."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rows, pos = rows.contiguous().long(), pos.contiguous().long()
    (B, H, D), (s_row, s_head, s_pos, s_d) = q.shape, k_cache.stride()
    assert s_d == 1 and v_cache.stride() == k_cache.stride()
    out = q.new_empty(B, H, D)
    lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   s_row, s_head, s_pos, rows.data_ptr(), pos.data_ptr(), out.data_ptr(), B, H, D, D ** -0.5)
    return out


def _attend_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
                      pos: Tensor) -> Tensor:
    """What `attend_one` computes, in PyTorch: write each row's k, v (B, H, D) at pos[b] of cache
    row rows[b], then attend with q (B, H, D) to that row's positions 0..pos[b]."""
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    n = int(pos.max()) + 1
    mask = (torch.arange(n)[None, :] <= pos[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_cache[rows, :, :n], v_cache[rows, :, :n], attn_mask=mask)[:, :, 0]


@torch.library.register_fake("gpt::gemv_f32")
def _(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("gpt::gemv_u8s8")
def _(x: Tensor, w: Tensor, w_sum: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.int32)


@torch.library.register_fake("gpt::linear_u8s8")
def _(x: Tensor, w: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("gpt::attend_one")
def _(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
    return torch.empty_like(q)
