"""The fastest settings this machine runs a model with, chosen when the user names none.

`gpt-serve` and `gpt-generate` call `choose` after loading (and quantizing) the model, so that
the first thing a user runs is the fast configuration, not one found in the benchmark docs.
Only settings whose outputs stay put are chosen here:

- **the compiled decode step** (`gpt.compile_decode`): the same arithmetic as the eager step,
  fused. Chosen on a CPU where torch.compile can build its C++ kernels; where compiling fails
  anyway, the caller serves eagerly, as it does when asked to compile. On a GPU the decode step
  already replays CUDA graphs, and compiling is left to the user.
- **a float16 KV cache**: keys and values rounded to halves as they are written, the arithmetic
  in float32, so decoding follows a float32 cache to within rounding (the tests hold it to the
  same greedy tokens). Chosen where our attention kernel reads the halves directly; elsewhere
  attention would convert the whole cache on every step, and the model's dtype is kept.

Quantization is never chosen: int8 weights change the logits, so it stays the user's call; the
one-line summary `describe` returns says when it would be faster.

Compiling costs start-up time, which a server pays once and a one-shot `gpt-generate` pays on
every run: there `choose` is told how many tokens the run will decode (`tokens`) and compiles
only when that many steps win back the compile time.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

# A one-shot run compiles only when it decodes at least this many tokens: below it the compile
# time, even from inductor's disk cache, is more than the faster steps save (docs/benchmarks.md,
# "Default settings", has the times this was set from).
COMPILE_PAYS_AFTER_TOKENS = 4096


@dataclass(frozen=True)
class FastSettings:
    compile: bool  # compile the decode step (gpt.compile_decode)
    kv_cache_dtype: torch.dtype | None  # None: the model's own dtype
    reasons: tuple[str, ...]  # why, one phrase per setting, for the start-up log


@functools.cache
def cpp_compiler_present() -> bool:
    """Whether inductor finds a C++ compiler here (what compiling a CPU graph needs)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception:  # an inductor without this helper, or no compiler where it looked
        return False
    return shutil.which(compiler) is not None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compile_pays(model: nn.Module, tokens: int | None) -> tuple[bool, str]:
    device = next(model.parameters()).device
    if device.type != "cpu":
        return False, "not compiled (the decode step replays CUDA graphs on a GPU)"
    if not torch._dynamo.is_dynamo_supported():
        return False, "not compiled (torch.compile does not run on this Python)"
    if not cpp_compiler_present():
        return False, "not compiled (no C++ compiler for torch.compile)"
    if tokens is not None and tokens < COMPILE_PAYS_AFTER_TOKENS:
        return False, f"not compiled (a run of {tokens} tokens does not win back the compile time)"
    return True, "compiled decode step"


def half_cache_fits(model: nn.Module) -> bool:
    """Whether our attention kernel reads a float16 cache of `model` directly (see
    gpt.attention's dispatch): float32 activations on a CPU with F16C, a GPT, a head size it
    handles."""
    from . import kernels

    config = model.config
    head_size = config.n_embd // config.n_head
    param = next(model.parameters())  # an int8 model keeps float32 norms and biases
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and not config.is_seq2seq
        and head_size % 8 == 0
        and head_size <= 256
        and kernels.attention_f16_available()
    )


def _kv_dtype(model: nn.Module) -> tuple[torch.dtype | None, str]:
    if half_cache_fits(model):
        return torch.float16, "float16 KV cache (our kernel reads halves)"
    return None, f"{_name(next(model.parameters()).dtype)} KV cache"


def choose(
    model: nn.Module,
    *,
    compile: bool | None = None,
    kv_cache_dtype: torch.dtype | str | None = "auto",  # None: the model's dtype
    tokens: int | None = None,
) -> FastSettings:
    """The settings to run `model` with: each one the caller gives (not None / not "auto") is
    kept, the others chosen for this machine. `tokens`: how many tokens a one-shot run decodes
    (None: a server, which compiles once for all its requests)."""
    reasons = []
    if compile is None:
        compile, why = _compile_pays(model, tokens)
        reasons.append(why)
    else:
        reasons.append("compiled decode step (--compile)" if compile else "not compiled (--no-compile)")
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype == "auto":
        kv_cache_dtype, why = _kv_dtype(model)
        reasons.append(why)
    elif kv_cache_dtype is None:
        reasons.append(f"{_name(next(model.parameters()).dtype)} KV cache")
    else:
        if isinstance(kv_cache_dtype, str):
            kv_cache_dtype = getattr(torch, kv_cache_dtype)
        reasons.append(f"{_name(kv_cache_dtype)} KV cache (--kv-cache-dtype)")
    return FastSettings(compile=compile, kv_cache_dtype=kv_cache_dtype, reasons=tuple(reasons))


def describe(settings: FastSettings, model: nn.Module, quantized: bool) -> str:
    """One line for the start-up log: what was chosen, and the flag that would be faster."""
    line = "decoding with: " + ", ".join(settings.reasons)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not quantized:
        line += "; --quantize int8 would be faster (8-bit weights: outputs change slightly)"
    elif on_cpu and not settings.compile and cpp_compiler_present():
        line += "; --compile would be faster"
    return line
