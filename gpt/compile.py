"""A compiled decode step: `gpt.compile_decode(model)`.

A decode step of a small model on a CPU is hundreds of small ops (layer norms, the int8 layers'
activation quantization and rescaling, residuals, the cache writes), each paying the eager
dispatcher's cost; torch.compile fuses them into a few generated kernels around the matmuls.
Only the step of a single row and a single token is compiled: the latency-bound case (one
stream), where the small ops weigh most, and one graph that every step of any length reuses
(`dynamic=True`; the cache's host-side bookkeeping, `KVCache.advance`, stays outside it).
Batched steps and prefill keep the eager path: their shapes (rows, masks, prompt lengths) vary,
and a new graph compiled in the middle of serving would stall every stream for as long.

Where it pays depends on the kernels underneath, so it is opt-in and measured in
`benchmarks/llamacpp.py`: with int8 layers (`gpt.quantize`) the step is all small ops around
the matrix products, and compiling wins; a float32 step is nearly all matrix products (our
single-row kernel, `gpt.native`, runs both eagerly and compiled), and compiling does not pay.

Compiling takes tens of seconds per graph on a small CPU (inductor caches its work on disk, so
a second start is quicker). `warm_up` compiles the graph before the first request needs it.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from .kv_cache import KVCache


def compile_decode(model: nn.Module) -> nn.Module:
    """Make `model.step` with one token per row run through torch.compile; returns the model."""
    # On a CPU, inductor's C++ wrapper calls the step's kernels and ops with no Python between
    # them, which measured faster (README, "A compiled decode step").
    options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
    model._compiled_stack = torch.compile(model._run_stack, dynamic=True, fullgraph=True, options=options)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_stack", None) is not None


@torch.inference_mode()
def warm_up(model: nn.Module, cache: Optional[KVCache] = None, steps: int = 3) -> float:
    """Compile now rather than in the first request: a few single-row decode steps in row 0 of
    `cache` (the one the caller will decode with: the graph is specialised to its shape; by
    default a new one-row cache), which is then reset. Returns the seconds spent."""
    t0 = time.perf_counter()
    if cache is None:
        cache = model.new_cache(1)
    row = slice(0, 1)
    model.start([[1, 1]], cache, rows=row)  # two tokens: prefill stays eager
    for _ in range(steps):  # lengths 3, 4, ...: the graph must not depend on the cache length
        model.step(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache, rows=row)
    cache.reset(row)
    return time.perf_counter() - t0
