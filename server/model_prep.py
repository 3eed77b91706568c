"""Getting a model ready to serve, once, before the engine thread starts: packed weights, a
compiled decode step, CUDA graphs of the decode step.

Each is an optimisation that leaves the outputs as they are; where one cannot be had (no C++
compiler for torch.compile, a GPU graph that does not replay exactly), the engine serves
without it and the log says so.
"""

from __future__ import annotations

import logging
import time

import gpt
from gpt import pack_linear_weights
from gpt.compile import warm_up
from gpt.cuda_graphs import record_decode_graphs

log = logging.getLogger("gpt-serve.engine")


def prepare_model(
    model,
    cache,
    *,
    max_batch_size: int,
    pack_weights: bool = True,
    compile_decode: bool = False,
    cuda_graphs: bool = True,
) -> None:
    """Make `model` (in eval mode, decoding into `cache`) fast to serve:

    pack_weights: give its linear layers a second, oneDNN-blocked copy of their weights, which
    multi-row forwards on a CPU read faster (a no-op elsewhere; see gpt.linear.Linear.pack).
    compile_decode: torch.compile the decode step (gpt.compile_decode) and warm it up now, in
    `cache`; where compiling fails, warn and serve uncompiled.
    cuda_graphs: on a GPU, record the decode step of every batch size as CUDA graphs now
    (gpt.cuda_graphs); an encoder-decoder decodes eagerly."""
    if pack_weights:
        pack_linear_weights(model, rows_hint=max_batch_size)
    if compile_decode:
        _compile(model, cache)
    if cuda_graphs and model.device.type == "cuda" and not model.config.is_seq2seq:
        t0 = time.perf_counter()
        n, problem = record_decode_graphs(model, cache, max_batch_size)
        if problem:
            log.warning("CUDA graphs of the decode step are off (%s); decoding eagerly", problem)
        else:
            seconds = time.perf_counter() - t0
            log.info("decode step: %d CUDA graphs recorded and checked in %.1f s", n, seconds)


def _compile(model, cache) -> None:
    gpt.compile_decode(model)
    log.info("compiling the decode step (torch.compile) ...")
    try:
        log.info("decode step compiled in %.1f s", warm_up(model, cache))
    except Exception as e:  # no C++ compiler, an unsupported op or device: serve uncompiled
        model._compiled_stack = None
        cache.reset()
        log.warning(
            "--compile: torch.compile failed (%s: %s); serving without it",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
