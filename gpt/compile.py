"""A compiled decode step: `gpt.compile_decode(model)`.

A decode step of a small model on a CPU is hundreds of small ops (layer norms, the int8 layers'
activation quantization and rescaling, residuals, the cache writes), each paying the eager
dispatcher's cost; torch.compile fuses them into a few generated kernels around the matmuls.
Only steps of one token per row are compiled, the latency-bound case, where the small ops weigh
most; a forward over a speculative draft is such a step, one row per drafted token
(gpt.transformer). Steps of a single row always compile, on one graph with one sequence's
drafted rows (the number of rows symbolic; every layer on one row's kernel: gpt.step_rows).
Steps of several sequences compile where the graph runs the kernels the eager step runs
(`_batches_compile`: int8 layers on a CPU without VNNI, whose batches run on our own kernel):
one graph for every batch size, one row included, so that a row's numbers never depend on how
many rows run with it. Elsewhere eager batches run on oneDNN's prepacked weights, which a graph
does not reach, and they stay eager, as does prefill: its shapes (masks, prompt lengths) vary,
and a new graph compiled in the middle of serving would stall every stream for as long.

Dynamo's guards, the checks that decide at every call whether a compiled graph still fits,
cost more than the step's small ops: there is one for every module's attributes, hooks and
parameters, thousands for GPT-2 small, checked on every step. Where the step's inputs
are all tensors, with no Python numbers that a graph could bake in (a decoder-only model on a
CPU with our attention kernel, `gpt.kernels`, which finds each row's length in the cache on its
own), the step runs without them: one graph per kind of call, on a copy of the step's code of
its own (dynamo keeps graphs per code object, so no other model or call can be handed this
one), picked by a key that `_key` builds from what the graph was traced with: the cache's
shape and dtype, the device, the grad mode. What the key cannot see is the model changing
after compiling: moving or casting it (`model.to`) drops the graphs, but quantize or load other
modules before `compile_decode`, not after. Every other step (the encoder-decoder, a GPU,
PyTorch's attention) runs under torch.compile's own guards, with one graph for every length
(`dynamic=True`).

Compiling costs a C++ compiler and start-up time, so it is opt-in; what it gains is measured
in `benchmarks/llamacpp.py`. With int8 layers (`gpt.quantize`) the step is mostly small ops
around the matrix products, and compiling gains most; a float32 step is mostly weight reads,
and it gains less, but still: once a step has streamed the weights through the CPU's caches,
every op and line of Python around the kernels runs from cold caches, and compiled there are
few of them.

Compiling a graph takes long next to a step (inductor caches its work on disk, so a second
start is quicker). `warm_up` compiles the graph before the first request needs it.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable

import torch
import torch.nn as nn

from . import step_rows
from .attention import native_attention_fits
from .kv_cache import KVCache
from .quantization import Int8Linear, qlinear_available

# torch.compile's guard filters came with torch 2.8; before that every step keeps the guards
_SKIP_GUARDS = getattr(torch.compiler, "skip_all_guards_unsafe", None)


def _batches_compile(head: nn.Module) -> bool:
    """Whether steps of several rows compile too: where the compiled graph runs the kernels the
    eager step runs, int8 layers on a CPU without VNNI (their batches run on our kernel there,
    since oneDNN's int8 linear is inexact: gpt.quantization). Elsewhere eager batches run on
    oneDNN's prepacked weights, which a compiled graph does not reach (inductor picks its own
    matmuls), and compiled they were slower (docs/internals/kernels.md, "The compiled decode step")."""
    return isinstance(head, Int8Linear) and head.weight_q.device.type == "cpu" and not qlinear_available()


class CompiledStep:
    """`model._run_stack` for steps of one token per row, compiled (see the module's doc)."""

    def __init__(self, model: nn.Module):
        # On a CPU, inductor's C++ wrapper calls the step's kernels and ops with no Python between
        # them, which measured faster (docs/benchmarks.md, "Kernels and the decode step").
        self._options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
        self._method = model._run_stack
        self.guarded = torch.compile(self._method, dynamic=True, fullgraph=True, options=self._options)
        self.unguarded: dict[tuple, Callable] = {}

    def reset(self) -> None:
        """Forget the unguarded graphs (the model's parameters moved or changed dtype)."""
        self.unguarded.clear()

    @staticmethod
    def _key(stack, wte, idx, cache, view, memory, head, last_only, n_tokens) -> tuple | None:
        """What an unguarded graph is specialised to, or None where the step must keep dynamo's
        guards (inputs that are Python numbers, or attention that reads them). Our attention
        kernel finds each row's keys from its position, so a step of rows of different lengths
        needs no mask: one graph serves rows of any lengths."""
        layer = cache.layers[0]
        if (
            _SKIP_GUARDS is None
            or memory is not None
            or cache.max_src_len
            or head is None
            or not last_only
            or n_tokens is not None
            or not native_attention_fits(wte.weight.dtype, layer, stack.training)
        ):
            return None
        return (
            tuple(layer.k.shape),
            layer.k.dtype,
            wte.weight.dtype,
            idx.dtype,
            idx.is_inference(),
            view.rows.dtype,
        )

    def _compile_unguarded(self) -> Callable:
        f = self._method.__func__
        own = types.FunctionType(
            f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__
        )
        own.__kwdefaults__ = f.__kwdefaults__
        options = {**self._options, "guard_filter_fn": _SKIP_GUARDS}
        return torch.compile(
            types.MethodType(own, self._method.__self__), dynamic=False, fullgraph=True, options=options
        )

    def __call__(
        self,
        stack,
        wte,
        idx,
        pos,
        *,
        mask,
        causal,
        cache,
        view,
        memory,
        memory_mask,
        head=None,
        last_only=False,
        n_tokens=None,
    ):
        batched, every_batch = idx.shape[0] > 1, _batches_compile(head)
        # one row, or one sequence's rows (a draft being verified: gpt.step_rows)
        one_sequence = not batched or step_rows.active()
        key = (
            None
            if not (one_sequence or every_batch)
            else self._key(stack, wte, idx, cache, view, memory, head, last_only, n_tokens)
        )
        if key is None and (batched or mask is not None):
            run = self._method  # only steps of one row compile with guards: see the module's doc
        elif key is None:
            run = self.guarded
        else:
            mask = None  # our attention kernel does not read it (`_key`)
            run = self.unguarded.get(key)
            if run is None:
                run = self.unguarded[key] = self._compile_unguarded()
            # One graph for every number of rows, one included: of any batch where batches
            # compile, else of one sequence. With no guards to catch a graph specialised to the
            # first call's rows, their number must stay symbolic, and unbacked: a backed size
            # is specialised where it is 1.
            for t in (idx, pos, view.rows, view.write_pos):
                torch._dynamo.decorators.mark_unbacked(t, 0)
        # a step of one sequence picks its layers' kernels as one row does, and traces so
        # (where batches share the graph, their kernels are one row's anyway)
        one_row_kernels = one_sequence and not every_batch
        with step_rows.one_sequence() if one_row_kernels else contextlib.nullcontext():
            return run(
                stack,
                wte,
                idx,
                pos,
                mask=mask,
                causal=causal,
                cache=cache,
                view=view,
                memory=memory,
                memory_mask=memory_mask,
                head=head,
                last_only=last_only,
                n_tokens=n_tokens,
            )


def compile_decode(model: nn.Module) -> nn.Module:
    """Make `model.step` with one token per row run through torch.compile; returns the model.
    Call it last: after `gpt.quantize` and loading weights."""
    model._compiled_stack = CompiledStep(model)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_stack", None) is not None


@torch.inference_mode()
def warm_up(model: nn.Module, cache: KVCache | None = None, steps: int = 3) -> float:
    """Compile now rather than in the first request: a few single-row decode steps in row 0 of
    `cache` (the one the caller will decode with: the graph is specialised to its shape; by
    default a new one-row cache) and, where batched steps compile too (`_batches_compile`) and
    the cache has rows for it, steps of rows 0 and 1 at different lengths, and a speculative
    verification in row 0 (a batched step too: gpt.transformer); the rows are then reset. Returns
    the seconds spent."""
    t0 = time.perf_counter()
    if cache is None:
        cache = model.new_cache(1)
    batches = [[[1, 1]]]  # two tokens: prefill stays eager
    if cache.batch_size >= 2 and _batches_compile(getattr(model, "lm_head", None)):
        batches.append([[1, 1], [1, 1, 1]])  # ragged: the graph must not depend on the rows' lengths
    for prompts in batches:
        rows = slice(0, len(prompts))
        model.start(prompts, cache, rows=rows)
        for _ in range(steps):  # lengths 3, 4, ...: the graph must not depend on the cache length
            model.step(torch.zeros(len(prompts), 1, dtype=torch.long, device=model.device), cache, rows=rows)
        cache.reset(rows)
    if _batches_compile(getattr(model, "lm_head", None)) and not model.config.is_seq2seq:
        # a speculative draft's verification: a batched step whose rows share one cache row
        model.start([[1, 1]], cache, rows=slice(0, 1))
        ids = torch.zeros(1, 3, dtype=torch.long, device=model.device)
        model.step(ids, cache, rows=slice(0, 1), n_tokens=torch.tensor([3]), every=True)
        cache.reset(slice(0, 1))
    return time.perf_counter() - t0
