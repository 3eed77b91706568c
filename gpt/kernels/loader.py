"""Loading our kernels: build the C library for this machine (gpt.kernels.build), give the
gpt:: ops (gpt.kernels.ops) their CPU kernels, and check them as registered before any call is
routed to them. Anything missing or wrong leaves the kernels out, with the reason kept for
`gpt.kernels.status()`; PyTorch's kernels then run as before."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess

import torch

from . import build, ctypes_ops, ops
from .reference import self_check

log = logging.getLogger(__name__)

not_built = ""  # why the kernels are not in use, once known
registered = ""  # how the gpt:: ops reach the kernels: "C++" or "ctypes"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The C library, built, loaded, registered and checked on the first call; None where the
    kernels are not in use (`not_built` says why)."""
    global not_built
    try:
        if os.environ.get("GPT_NATIVE_KERNELS", "1") == "0":
            raise RuntimeError("turned off by GPT_NATIVE_KERNELS=0")
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"built only for x86-64 Linux, not {platform.system()} {platform.machine()}")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (cc) found")
        lib = ctypes_ops.bind(build.compile_kernels(cc))
        isa = lib.gemv_isa()
        if isa == 0:
            raise RuntimeError("this CPU has neither AVX2 nor AVX-512")
        _register(lib, isa)  # and checks them
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        not_built = str(e)
        log.info("native decode kernels not in use (%s): PyTorch's kernels run instead", e)
        return None


def check(lib: ctypes.CDLL, kernels: tuple) -> None:
    """`reference.self_check` of `lib`'s kernels reached through `kernels` (in ops.NAMES' order)."""
    has_f16 = hasattr(lib, "attend_one_f16")
    # The first kernel call runs this, and it may come under inference_mode (gpt.generate's
    # decoding): the GELU backward's check needs autograd, which inference tensors refuse.
    with torch.inference_mode(False), torch.enable_grad():
        self_check(lib.gemv_isa(), has_f16, functools.partial(ctypes_ops.interleave, lib), *kernels)


def _register(lib: ctypes.CDLL, isa: int) -> None:
    """Give the gpt:: ops their CPU kernels: `csrc/ops.cpp`'s where a C++ compiler builds it
    against this PyTorch (called by the dispatcher directly), else the library's through ctypes
    (a Python call and argument conversion more per call); then check them once, as registered."""
    global registered
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if os.environ.get("GPT_NATIVE_OPS") == "ctypes":
            raise RuntimeError("GPT_NATIVE_OPS=ctypes")
        if not cxx:
            raise RuntimeError("no C++ compiler (c++) found")
        torch.ops.load_library(str(build.compile_ops(cxx)))
        registered = "C++"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("gpt:: ops through ctypes (%s)", e)
        for name, fn in zip(ops.NAMES, ctypes_ops.ops(lib)):
            ops.LIBRARY.impl(name, fn, "CPU")
        registered = "ctypes"
    check(lib, tuple(getattr(torch.ops.gpt, name) for name in ops.NAMES))
