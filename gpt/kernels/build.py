"""Building our C kernels (gpt/kernels/csrc) for this machine: the C library on first use
with the system's C compiler and `-march=native`, and the C++ file that registers them as the
gpt:: ops' CPU kernels, against the installed PyTorch. Each build is cached under a key of the
sources, the compiler and its version, the flags and the CPU's flags, and written atomically
(another process may be building the same one)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("gemv.c", "attention.c", "rows.c", "gelu.c")]
HEADERS = [CSRC / "exp_nonpos.h"]
OPS_SOURCE = CSRC / "ops.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cpu_flags() -> str:
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
    key = hashlib.sha256("\0".join([*key_parts, compiler, version, " ".join(args), cpu_flags()]).encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # another process may be building it too
    os.close(fd)
    try:
        done = subprocess.run([compiler, *args, "-o", tmp], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compile_kernels(cc: str) -> Path:
    """The C kernels' shared library for this compiler and CPU: from the cache, or built now."""
    return _build(
        "gemv", cc, [*FLAGS, *map(str, SOURCES)], [s.read_text() for s in (*SOURCES, *HEADERS)], 120
    )


def compile_ops(cxx: str) -> Path:
    """The C kernels and `ops.cpp`, which registers them as the gpt:: ops' CPU kernels, linked
    against this PyTorch (its headers come with every wheel)."""
    from torch.utils import cpp_extension

    lib_dirs = cpp_extension.library_paths()
    args = [
        *FLAGS,
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{d}" for d in cpp_extension.include_paths()),
        # "-x c" before each C file: GCC's C++ driver compiled a second C file as C++ otherwise
        *(arg for source in SOURCES for arg in ("-x", "c", str(source))),
        "-x",
        "c++",
        str(OPS_SOURCE),
        "-x",
        "none",
        *(f"-L{d}" for d in lib_dirs),
        *(f"-Wl,-rpath,{d}" for d in lib_dirs),
        "-lc10",
        "-ltorch_cpu",
    ]
    return _build(
        "ops", cxx, args, [s.read_text() for s in (*SOURCES, *HEADERS, OPS_SOURCE)] + [torch.__version__], 300
    )
