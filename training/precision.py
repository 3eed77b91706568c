"""`--dtype auto` (the default): bfloat16 autocast where the CPU has bfloat16 arithmetic of its
own (AVX-512 BF16 or AMX) and a probe measures it faster for this model, float32 elsewhere.

Elsewhere bfloat16 would be converted to float32 and back around every matmul, which is slower
than float32 itself. The probe times forward and backward passes of the model being trained, at
one row of the training length, in each precision (alternated, the random state and gradients
left as they were); small models, whose steps are bound by everything but the matmuls, are not
probed. On a GPU, auto is float32: ask for bfloat16 or float16 there. The choice is printed and
saved with the run, so a resumed run keeps it."""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext

import torch

from gpt.kernels import build

from . import distributed as ddp

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_PARAMS = 20_000_000  # smaller models are not probed: float32
PROBES = 3  # timed passes per precision, after one untimed pass of each
FASTER = 0.9  # bfloat16 must take at most this share of float32's time


def cpu_flags() -> set[str]:
    return set(build.cpu_flags().partition(":")[2].split())  # the kernels' own reading of cpuinfo


def native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def choose(model: torch.nn.Module, kind: str, length: int, device: torch.device) -> tuple[str, str | None]:
    """(dtype, why) for --dtype auto; why is None where nothing was measured."""
    params = sum(p.numel() for p in model.parameters())
    if device.type != "cpu" or not native_bf16() or kind != "gpt" or params < MIN_PARAMS:
        return "float32", None
    f32, bf16 = probe(model, length)
    why = f"a pass in bfloat16 autocast took {bf16 / f32:.2f}x float32's time on this CPU"
    return ("bfloat16" if bf16 <= FASTER * f32 else "float32"), why


def resolve(cfg, model: torch.nn.Module, device: torch.device, d) -> None:
    """Set cfg.dtype for --dtype auto (the same on every rank), and say so where it measured."""
    if cfg.dtype != "auto":
        return
    length = min(cfg.block_size or model.config.block_size, model.config.block_size)
    cfg.dtype, why = choose(model, cfg.model, length, device)
    if ddp.any_rank(cfg.dtype != "bfloat16", d):
        cfg.dtype = "float32"
    if why and d.is_main and not cfg.quiet:
        print(f"gpt-train: --dtype auto: {cfg.dtype} ({why})", file=sys.stderr, flush=True)


def probe(model: torch.nn.Module, length: int) -> tuple[float, float]:
    """Median seconds of a forward and backward pass of one row, in float32 and in bfloat16
    autocast; torch's random state and the model's gradients are restored."""
    from .loss import compute_loss

    rng, was_training = torch.get_rng_state(), model.training
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:  # the probe's backward passes must not add to gradients the run holds
        p.grad = None
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    contexts = {"float32": nullcontext, "bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in contexts}
    model.train()
    try:
        for i in range(PROBES + 1):
            for name, context in contexts.items():
                start = time.perf_counter()
                with context():
                    loss = compute_loss(model, (x, x), "gpt")
                loss.backward()
                if i:  # the first pass of each allocates and warms up
                    times[name].append(time.perf_counter() - start)
                for p in model.parameters():
                    p.grad = None
    finally:
        for p, g in grads.items():
            p.grad = g
        torch.set_rng_state(rng)
        model.train(was_training)
    return statistics.median(times["float32"]), statistics.median(times["bfloat16"])
