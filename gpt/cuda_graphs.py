"""CUDA graphs of the decode step: `gpt.cuda_graph_decode(model)` (gpt-serve and gpt-generate
turn it on for a GPU unless told `--eager`).

On a GPU a small model's decode step is bound by kernel launches, not by the GPU: a GPT-2-small
step is a few hundred short kernels, every one behind the Python and dispatcher
work that launches it. A CUDA graph records the step's kernels once and replays them all with
one launch.

A graph fixes every shape and address, so the step it records is always the same: rows 0..Bb-1
of one cache, one token each, attending to keys 0..Kb-1, with Bb and Kb rounded up to powers of
two (one graph per pair, recorded the first time it is needed, or all at once by `record_all`).
Rows of that range that are not stepping ride along: their keys and values go to the cache's
spare slot, which is never read, and their outputs are dropped; keys past a row's own length are
masked out. The inputs (token ids, positions, which row is whose) reach the graph's fixed
buffers by copies that do not wait for the GPU, so a step never synchronises with the host; the
caller does, once, when it reads the tokens it chose.

Graphs belong to one cache (they hold its buffers' addresses) and are dropped with it. They also
hold the weights' addresses: `model.to(...)` drops them, and a model changed any other way
(replaced modules or parameters) needs `cuda_graph_decode` again. The encoder-decoder keeps the
eager step: its cross-attention reads sources of other lengths per row.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn
from torch import Tensor

from .kv_cache import CacheView, KVCache, Rows

MIN_KEYS = 64  # the smallest key bucket: shorter rows attend to a few masked keys more, not another graph


def _why(e: BaseException) -> str:
    """A one-line account of an exception; a compiler's errors put the cause past the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Set TORCH")]
    return f"{type(e).__name__}: {' '.join(lines)[:400]}"


def _bucket(n: int, low: int, cap: int) -> int:
    b = low
    while b < n:
        b *= 2
    return min(b, cap)


def _buckets(low: int, cap: int) -> list[int]:
    out = [min(low, cap)]
    while out[-1] < cap:
        out.append(min(out[-1] * 2, cap))
    return out


class _Graph:
    """One recorded step of rows 0..rows-1 against keys 0..keys-1 of one cache."""

    def __init__(self, rows: int, keys: int, spare: int, device: torch.device):
        self.rows, self.keys, self.spare = rows, keys, spare
        with torch.inference_mode(False):  # filled by copies outside inference mode too
            self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # the caller's order
            # [0]: each cache row's write position (the spare slot for riders); [1]: which of the
            # caller's tokens each cache row takes; [2]: which cache row each of the caller's rows is
            self.index = torch.zeros(3, rows, dtype=torch.long, device=device)
            self.key_ids = torch.arange(keys, device=device)
            self.row_ids = torch.arange(rows, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def _body(self, model: nn.Module, stack, wte, head, cache: KVCache) -> Tensor:
        write = self.index[0][:, None]  # (rows, 1)
        mask = (self.key_ids[None, :] <= write)[:, None, None, :]  # (rows, 1, 1, keys)
        view = CacheView(
            rows=self.row_ids, select=slice(0, self.rows), write_pos=write, kv_len=self.keys, src_len=0
        )
        pos = write.clamp(
            max=model.config.block_size - 1
        )  # riders' spare slot may lie past the last position
        run = model._compiled_stack or model._run_stack
        logits = run(
            stack,
            wte,
            self.tokens[self.index[1]],
            pos,
            mask=mask,
            causal=False,
            cache=cache,
            view=view,
            memory=None,
            memory_mask=None,
            head=head,
            last_only=True,
        )
        return logits[self.index[2]]

    def record(self, model: nn.Module, stack, wte, head, cache: KVCache, pool) -> None:
        self.index[0].fill_(self.spare)  # while recording every row rides: warm-up writes only spare slots
        self.index[1:].zero_()
        device = cache.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(
            side
        ):  # lazy initialisation (library handles, workspaces) stays out of the graph
            for _ in range(2):
                self._body(model, stack, wte, head, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.out = self._body(model, stack, wte, head, cache)
        self.graph = graph

    def load(self, idx: Tensor, rows: Tensor, positions: Tensor) -> None:
        """Put a step's inputs in the graph's buffers: token ids idx (B, 1) for cache rows
        `rows` (B,), appended at `positions` (B,) (both on the host)."""
        B = len(rows)
        host = torch.zeros(3, self.rows, dtype=torch.long, pin_memory=self.index.is_cuda)
        host[0].fill_(self.spare)
        host[0, rows] = positions
        host[1, rows] = torch.arange(B)
        host[2, :B] = rows
        self.index.copy_(host, non_blocking=True)  # pinned: the host goes on while the GPU copies
        self.tokens[:B].copy_(idx)

    def replay(self, idx: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
        self.load(idx, rows, positions)
        self.graph.replay()
        # Graphs share one memory pool, so another graph's replay may reuse this output's memory:
        # the caller gets its own copy.
        return self.out[: len(rows)].clone()


class DecodeGraphs:
    """The recorded decode steps of one model, per cache: see the module's docstring."""

    def __init__(self):
        # cache -> (its graphs' memory pool, {(rows, keys): graph}). A pool per cache: PyTorch
        # retires a pool once every graph recorded into it is gone, and refuses (an internal
        # assert) to record into it again, so the graphs of a new cache need a new pool.
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.failed: str | None = None  # why recording failed; every step is eager after that

    def clear(self) -> None:
        self._by_cache.clear()

    def count(self, cache: KVCache) -> int:
        return len(self._by_cache.get(cache, (None, {}))[1])

    def accepts(self, idx: Tensor, cache: KVCache, n_tokens, last_only: bool) -> bool:
        """Whether this step can replay a graph: one token per row, on a GPU, for inference,
        decoder-only (no encoder outputs in the cache), logits of the last token wanted."""
        return (
            self.failed is None
            and idx.is_cuda
            and idx.dim() == 2
            and idx.shape[1] == 1
            and n_tokens is None
            and last_only
            and cache.max_src_len == 0
            and not torch.is_grad_enabled()
            and cache.device == idx.device
        )

    def _graph(self, model, stack, wte, head, cache: KVCache, rows: int, keys: int) -> _Graph:
        if cache not in self._by_cache:
            self._by_cache[cache] = (torch.cuda.graph_pool_handle(), {})
        pool, graphs = self._by_cache[cache]
        g = graphs.get((rows, keys))
        if g is None:
            g = _Graph(rows, keys, cache.max_len, cache.device)
            g.record(model, stack, wte, head, cache, pool)
            graphs[(rows, keys)] = g
        return g

    def step(self, model, stack, wte, head, idx: Tensor, cache: KVCache, rows: Rows | None) -> Tensor | None:
        """Append one token per row (idx (B, 1)) to `rows` of the cache; next-token logits (B, V).
        None, with the cache unchanged, when the graph could not be recorded: the caller steps
        eagerly instead (as it will from then on, after one warning)."""
        rows_t, positions = cache.advance_one(idx.shape[0], rows)
        try:
            g = self._graph(
                model,
                stack,
                wte,
                head,
                cache,
                _bucket(int(rows_t.max()) + 1, 1, cache.batch_size),
                _bucket(int(positions.max()) + 1, MIN_KEYS, cache.max_len),
            )
        except RuntimeError as e:  # an op that cannot be recorded, out of memory, ...
            cache.lengths[rows_t] = positions  # nothing was appended
            self.failed = _why(e)
            warnings.warn(
                f"CUDA graphs of the decode step could not be recorded ({self.failed}); decoding eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        except BaseException:
            cache.lengths[rows_t] = positions
            raise
        return g.replay(idx, rows_t, positions)

    def check(self, model, cache: KVCache) -> str | None:
        """Step a short prompt in row 0 of `cache` once eagerly and once through a graph, and
        compare the logits: None when they agree, else what went wrong. Leaves row 0 empty."""
        row, tok = slice(0, 1), torch.tensor([[4]], device=cache.device)
        try:
            model._decode_graphs = None
            model.start([[1, 2, 3]], cache, rows=row)
            want = model.step(tok, cache, rows=row).float()
            model._decode_graphs = self
            model.start([[1, 2, 3]], cache, rows=row)  # start resets the row first
            got = model.step(tok, cache, rows=row)
        finally:
            model._decode_graphs = self
            cache.reset(row)
        if self.failed is not None:
            return self.failed
        err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        tol = 1e-3 if got.dtype == torch.float32 else 3e-2  # 16-bit logits round to ~1e-3 of their scale
        if not err <= tol:
            return f"a replayed step differs from the eager step (relative error {err:.1e})"
        return None

    def record_all(self, model, cache: KVCache, max_rows: int | None = None) -> int:
        """Record every graph that steps in `cache` can need (up to `max_rows` rows), so that no
        request waits for a recording; returns how many there are."""
        if cache.max_src_len or not cache.device.type == "cuda":
            return 0  # an encoder-decoder's steps stay eager, and a CPU has no graphs
        stack, wte, head = model.decode_parts()
        for rows in _buckets(1, min(max_rows or cache.batch_size, cache.batch_size)):
            for keys in _buckets(MIN_KEYS, cache.max_len):
                self._graph(model, stack, wte, head, cache, rows, keys)
        return self.count(cache)


def cuda_graph_decode(model: nn.Module) -> nn.Module:
    """Make the model's one-token decode steps on a GPU replay CUDA graphs; returns the model.
    A decoder-only model's steps only (the encoder-decoder's stay eager); on a CPU it changes
    nothing. Combine with `gpt.compile_decode` (call that first) to record the compiled step."""
    model._decode_graphs = DecodeGraphs()
    return model


@torch.inference_mode()
def record_decode_graphs(
    model: nn.Module, cache: KVCache, max_rows: int | None = None
) -> tuple[int, str | None]:
    """`cuda_graph_decode(model)`, then record every graph for `cache` now (`record_all`) and
    check one replay against the eager step: (graphs recorded, None), or (0, what went wrong),
    the model then left decoding eagerly and the cache empty. For a server's start-up."""
    graphs = cuda_graph_decode(model)._decode_graphs
    try:
        n = graphs.record_all(model, cache, max_rows)
        problem = graphs.check(model, cache)
    except RuntimeError as e:  # an op that cannot be recorded, out of memory, ...
        n, problem = 0, _why(e)
    if problem:
        model._decode_graphs = None
        cache.reset()
        return 0, problem
    return n, None
