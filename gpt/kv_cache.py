"""A preallocated key/value cache in which every row keeps its own length.

Rows are independent slots: a batch can hold sequences of different lengths, and a row can be
reset and reused while the others carry on (the server's continuous batching stands on this).
Keys and values are written in place at each token's position; nothing grows with `torch.cat`.

Padding tokens (rows that bring fewer tokens than the widest row in a forward pass) are written
to one spare position past the end that is never read, so they can never overwrite real keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

Rows = slice | Tensor


@dataclass
class CacheView:
    """Where one forward pass reads and writes: built by `KVCache.advance`, shared by all layers."""

    rows: Tensor  # (B,) cache row of each batch row, on the cache's device
    select: Rows  # the same rows as a slice when they are a contiguous range (reads are then views)
    write_pos: Tensor  # (B, T) position each token is written to (padding goes to the spare slot)
    kv_len: int  # keys 0 .. kv_len-1 are attended to
    src_len: int  # cross-attention keys 0 .. src_len-1 are attended to


class LayerCache(nn.Module):
    def __init__(
        self, batch: int, heads: int, max_len: int, head_dim: int, src_len: int, dtype: torch.dtype, device
    ):
        super().__init__()
        shape = (batch, heads, max_len + 1, head_dim)  # +1: the spare slot padding writes to
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if src_len:
            xshape = (batch, heads, src_len, head_dim)
            self.register_buffer("cross_k", torch.zeros(xshape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("cross_v", torch.zeros(xshape, dtype=dtype, device=device), persistent=False)

    def update(self, view: CacheView, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at `view.write_pos` and return all keys/values of these rows."""
        idx = (view.rows[:, None], slice(None), view.write_pos)
        self.k[idx] = k.transpose(1, 2).to(self.k.dtype)
        self.v[idx] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[view.select, :, : view.kv_len], self.v[view.select, :, : view.kv_len]

    def write_cross(self, rows: Tensor, k: Tensor, v: Tensor) -> None:
        S = k.shape[2]
        self.cross_k[rows, :, :S] = k.to(self.cross_k.dtype)
        self.cross_v[rows, :, :S] = v.to(self.cross_v.dtype)

    def read_cross(self, view: CacheView) -> tuple[Tensor, Tensor]:
        return self.cross_k[view.select, :, : view.src_len], self.cross_v[view.select, :, : view.src_len]


class KVCache(nn.Module):
    """Per-layer K/V buffers of shape (batch, heads, max_len, head_dim), plus each row's length.

    Lengths live on the CPU: deciding how much of the cache to read is host-side bookkeeping.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        src_len: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.batch_size, self.max_len, self.max_src_len = batch, max_len, src_len
        self.layers = nn.ModuleList(
            LayerCache(batch, heads, max_len, head_dim, src_len, dtype, device) for _ in range(n_layer)
        )
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.src_lengths = torch.zeros(batch, dtype=torch.long)
        self._device = self.layers[0].k.device

    @property
    def device(self) -> torch.device:
        return self._device

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._device = self.layers[0].k.device  # read at every step: kept, not looked up
        return out

    def resolve_rows(self, rows: Rows | None, B: int) -> tuple[Tensor, Rows]:
        """`rows` (None = the first B, a slice, or row ids) as (CPU row ids, the cheapest selector)."""
        if rows is None:
            rows = slice(0, B)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.batch_size)
            if step != 1 or stop - start != B:
                raise ValueError(f"rows {rows} do not match a batch of {B}")
            return torch.arange(start, stop), rows
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if rows.shape != (B,):
            raise ValueError(f"rows must have shape ({B},), got {tuple(rows.shape)}")
        if B and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise ValueError(f"rows must be in [0, {self.batch_size}), got {rows.tolist()}")
        if B and bool((rows[1:] - rows[:-1] == 1).all()):
            first = int(rows[0])
            return rows, slice(first, first + B)  # contiguous: read views, not gathered copies
        return rows, rows

    def _claim(self, B: int, T: int, rows: Rows | None, n_tokens: Tensor | None):
        """The host-side half of `advance`: check, then advance the lengths of B rows by the
        tokens they bring. Returns (row ids, selector, start lengths, tokens per row, kv_len)."""
        rows_t, select = self.resolve_rows(rows, B)
        start = self.lengths[rows_t]
        n = (
            torch.full((B,), T, dtype=torch.long)
            if n_tokens is None
            else torch.as_tensor(n_tokens).long().cpu()
        )
        if bool((n < 1).any() or (n > T).any()):
            raise ValueError(f"each row must bring between 1 and {T} tokens, got {n.tolist()}")
        end = start + n
        kv_len = int(end.max())
        self._check_fits(kv_len)
        self.lengths[rows_t] = end
        return rows_t, select, start, n, kv_len

    def advance_one(self, B: int, rows: Rows | None) -> tuple[Tensor, Tensor]:
        """Advance B rows by one token each, on the host alone (a replayed CUDA graph does the
        device side: `gpt.cuda_graphs`). Returns (row ids, the position each token goes to)."""
        rows_t, _, start, _, _ = self._claim(B, 1, rows, None)
        return rows_t, start

    def advance(self, B: int, T: int, rows: Rows | None, n_tokens: Tensor | None):
        """Advance the lengths of B rows by the tokens a forward pass is about to append (row b
        brings n_tokens[b] <= T real tokens, the rest is padding), and say where they go: the
        view for the layers, each token's position (B, T) (on CPU), the attention mask (or None
        when plain causal/no mask is exact), and whether plain causal attention is exact."""
        if T == 1 and n_tokens is None and B:
            return self._advance_one_token(B, rows)
        rows_t, select, start, n, kv_len = self._claim(B, T, rows, n_tokens)
        pos = start[:, None] + torch.arange(T)
        real = torch.arange(T)[None, :] < n[:, None]
        write_pos = torch.where(real, pos, torch.full_like(pos, self.max_len))
        uniform_start = bool((start == start[0]).all())
        padded = bool((n != T).any())
        if T == 1 and uniform_start:
            mask, causal = None, False  # every row sees all of its kv_len keys
        elif not padded and uniform_start and int(start[0]) == 0:
            mask, causal = None, True  # a plain prefill from position 0
        else:
            mask, causal = self._mask(pos, kv_len), False
        return self._view(rows_t, select, write_pos, kv_len), pos, mask, causal

    def advance_as_rows(self, B: int, T: int, rows: Rows | None, n_tokens: Tensor | None):
        """`advance` for a forward whose tokens each run as a decode step's row of one token (a
        speculative draft being verified: gpt.transformer): row b's n_tokens[b] real tokens become
        that many one-token rows of the same cache row, at consecutive positions. Returns the
        view over those N rows, each one's position (N, 1), and which of the (B, T) tokens are
        real. Only for attention that writes every row's key before any row reads (gpt.kernels'
        decode kernel): a token then sees the ones before it, as it would decoding one at a time."""
        rows_t, _, start, n, kv_len = self._claim(B, T, rows, n_tokens)
        real = torch.arange(T)[None, :] < n[:, None]
        pos = (start[:, None] + torch.arange(T))[real][:, None]
        flat = rows_t.repeat_interleave(n)
        return self._view(flat, flat, pos, kv_len), pos, real

    def _advance_one_token(self, B: int, rows: Rows | None):
        """`advance` for a decode step (one real token per row), with the bookkeeping in Python
        numbers: a step of a small model streams its weights through the CPU's caches, and every
        tensor op here then runs from cold caches, far slower than in isolation."""
        rows_t, select = self.resolve_rows(rows, B)
        lengths = self.lengths[select]  # a contiguous range (the usual case) is a view: updated in place
        starts = lengths.tolist()
        kv_len = max(starts) + 1
        self._check_fits(kv_len)
        pos = lengths[:, None].clone()
        if isinstance(select, slice):
            lengths += 1
        else:
            self.lengths[select] = pos[:, 0] + 1
        # rows of different lengths: each sees only its own keys
        mask = None if min(starts) == kv_len - 1 else self._mask(pos, kv_len)
        return self._view(rows_t, select, pos, kv_len), pos, mask, False

    def _check_fits(self, kv_len: int) -> None:
        if kv_len > self.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache length {self.max_len}")

    def _mask(self, pos: Tensor, kv_len: int) -> Tensor:
        """Each token (B, T positions) sees the keys at or before its position: (B, 1, T, kv_len)."""
        return (torch.arange(kv_len)[None, None, :] <= pos[:, :, None])[:, None].to(self.device)

    def _view(self, rows_t: Tensor, select: Rows, write_pos: Tensor, kv_len: int) -> CacheView:
        dev = self.device
        src_len = int(self.src_lengths[rows_t].max()) if self.max_src_len else 0
        if dev.type == "cpu":  # every step makes one: no copies, no calls
            return CacheView(rows_t, select, write_pos, kv_len, src_len)
        return CacheView(
            rows=rows_t.to(dev),
            select=select if isinstance(select, slice) else select.to(dev),
            write_pos=write_pos.to(dev),
            kv_len=kv_len,
            src_len=src_len,
        )

    def cross_mask(self, view: CacheView) -> Tensor | None:
        """Key-padding mask over the stored encoder outputs, or None when no row is padded."""
        lens = self.src_lengths[view.rows.cpu()]
        if bool((lens == view.src_len).all()):
            return None
        return (torch.arange(view.src_len)[None, :] < lens[:, None])[:, None, None, :].to(self.device)

    def reset(self, rows: Rows | None = None) -> None:
        """Forget rows (all by default) so they can take new sequences. Stale keys need no
        clearing: a row's keys are always written before they are read."""
        if rows is None:
            rows = slice(None)
        self.lengths[rows] = 0
        self.src_lengths[rows] = 0

    def rewind(self, rows: Rows, n: Tensor) -> None:
        """Forget the last n[i] positions of each of `rows` (drafted tokens that were not kept):
        like any stale key, they are written over before they are read again."""
        rows_t, _ = self.resolve_rows(rows, len(n))
        self.lengths[rows_t] -= torch.as_tensor(n, dtype=torch.long).cpu()

    def reorder(self, src_rows: Tensor, dst_rows: Tensor | None = None, positions: int | None = None) -> None:
        """Copy rows `src_rows` into `dst_rows` (default 0..len-1), e.g. to follow beam parents.
        All sources are read before any destination is written, so rows can swap places.
        `positions`: copy only the first that many positions of self-attention keys/values (the
        rest of a row is stale anyway), instead of whole rows."""
        src_rows = torch.as_tensor(src_rows, dtype=torch.long).cpu()
        dst_rows = torch.arange(len(src_rows)) if dst_rows is None else torch.as_tensor(dst_rows).long().cpu()
        s, d = src_rows.to(self.device), dst_rows.to(self.device)
        for layer in self.layers:
            for name, buf in layer.named_buffers():
                if positions is not None and name in ("k", "v"):
                    buf[d, :, :positions] = buf[s, :, :positions]
                else:
                    buf[d] = buf[s]
        self.lengths[dst_rows] = self.lengths[src_rows].clone()
        self.src_lengths[dst_rows] = self.src_lengths[src_rows].clone()

    def copy_prefix(self, src_row: int, dst_row: int, n: int) -> None:
        """Make row `dst_row` hold the first `n` tokens of row `src_row` (and nothing more): the
        keys and values of a shared prompt prefix, computed once. Not for encoder-decoder rows."""
        if not 0 < n <= int(self.lengths[src_row]) or src_row == dst_row:
            raise ValueError(
                f"cannot copy {n} positions from row {src_row} (length {int(self.lengths[src_row])}) "
                f"to row {dst_row}"
            )
        for layer in self.layers:
            layer.k[dst_row, :, :n] = layer.k[src_row, :, :n]
            layer.v[dst_row, :, :n] = layer.v[src_row, :, :n]
        self.lengths[dst_row] = n
        self.src_lengths[dst_row] = 0
