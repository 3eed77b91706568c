"""The prefix cache: which tokens each KV-cache row holds, and where a new request goes, so that
it starts from a row that already has its prompt's beginning (a chat's earlier turns, a shared
system prompt, the other `n` choices).

A finished request's keys and values stay in its row until the row is taken again. A new
request takes the free row sharing the longest token prefix with its prompt and prefills only
the rest. If the longest prefix is in a row that is in use (another choice of the same prompt,
a common system prompt), the request takes the least recently used free row and, once that
prefix is prefilled, copies its keys and values instead of computing them again. A request that
wants its prompt's logprobs computes the whole prompt: it reuses nothing.

The scheduler owns the rows and the cache; `PrefixIndex` remembers their contents and decides
the placement (`place`, `copy_shared`). A row's contents are:
  - a free row: the tokens whose keys and values it still holds (its last request's prompt and
    the output tokens that were fed back), until another request takes the row;
  - a row in use: its request's prompt (the keys and values appear as the prompt is prefilled;
    `Scheduler` only copies what is already written).
Everything here runs on the engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .requests import Request


class PrefixIndex:
    def __init__(self, rows: int, max_len: int):
        self.ids = torch.full((rows, max_len), -1, dtype=torch.long)
        self.known = torch.zeros(rows, dtype=torch.long)  # leading ids of each row that mean something
        self.last_used = [0] * rows  # a free row's release tick: the least recently used is evicted first
        self._tick = 0

    def common_prefix(self, prompt: Tensor, limit: Tensor) -> Tensor:
        """(rows,) the number of leading tokens of `prompt` (n,) that each row holds, at most
        `limit[row]` and at most n - 1 (a prefill needs one new token to yield logits)."""
        n = min(len(prompt) - 1, self.ids.shape[1])
        if n <= 0:
            return torch.zeros(len(self.known), dtype=torch.long)
        same = (self.ids[:, :n] == prompt[:n]).to(torch.int32).cumprod_(dim=1).sum(dim=1)
        return torch.minimum(same.long(), torch.minimum(limit, self.known))

    def claim(self, row: int, prompt: Sequence[int]) -> None:
        """A request takes `row`: its contents become (what will be) the request's prompt."""
        n = min(len(prompt), self.ids.shape[1])
        self.ids[row, :n] = torch.as_tensor(list(prompt[:n]), dtype=torch.long)
        self.known[row] = n

    def release(self, row: int, tokens: Sequence[int], written: int) -> None:
        """The request in `row` ended: the row keeps the keys and values of `tokens[:written]`."""
        written = min(written, len(tokens), self.ids.shape[1])
        self.ids[row, :written] = torch.as_tensor(list(tokens[:written]), dtype=torch.long)
        self.known[row] = written
        self._tick += 1
        self.last_used[row] = self._tick

    def forget(self, row: int) -> None:
        """The row's keys and values cannot be trusted (a forward failed part-way)."""
        self.known[row] = 0
        self.last_used[row] = 0

    def evictable(self, free: Sequence[int]) -> int:
        """The free row to overwrite when no cached prefix is wanted: an empty one, else the
        least recently used (lowest row on ties, so placement is deterministic)."""
        return min(free, key=lambda r: (int(self.known[r]) > 0, self.last_used[r], r))

    def swap(self, a: int, b: int) -> None:
        """Rows a and b traded their keys and values (the scheduler compacts the decode batch)."""
        self.ids[[a, b]] = self.ids[[b, a]]
        self.known[[a, b]] = self.known[[b, a]]
        self.last_used[a], self.last_used[b] = self.last_used[b], self.last_used[a]

    # --- placement ---------------------------------------------------------------------

    def place(self, r: Request, free: set[int], running: Sequence[Request]) -> tuple[int, int]:
        """The free row `r` takes and how many of its prompt tokens that row already holds. When
        a row in use (by one of `running`) holds a longer prefix, `r` is told to copy it from
        there once it is written (`copy_shared`)."""
        if r.prompt_logprobs is not None:
            return self.evictable(free), 0
        common = self.common_prefix(torch.tensor(r.prompt), self.known).tolist()
        best_free = max(free, key=lambda row: (common[row], -row))
        busy = [q for q in running if common[q.slot] > 0]
        best_busy = max(busy, key=lambda q: common[q.slot], default=None)
        shared = common[best_busy.slot] if best_busy is not None else 0
        if common[best_free] and common[best_free] >= shared:
            return best_free, common[best_free]
        if best_busy is not None:
            r.share_from, r.share_len = best_busy, shared
        return self.evictable(free), 0

    def copy_shared(self, r: Request, running: Sequence[Request], cache) -> int | None:
        """For a request placed to share a prefix: None while the request it shares with has not
        written that prefix; then copy the longest prefix any row of `cache` holds by now into
        r's row and return its length (0: nothing new to copy)."""
        src = r.share_from
        if src.slot >= 0 and src.prefilled < r.share_len:
            return None
        r.share_from = None
        in_use = {q.slot for q in running}
        rows = len(self.known)
        written = torch.where(torch.tensor([row in in_use for row in range(rows)]), cache.lengths, self.known)
        written[r.slot] = 0
        common = self.common_prefix(torch.tensor(r.prompt), written)
        row = int(common.argmax())
        n = int(common[row])
        if n <= r.prefilled:
            return 0
        cache.copy_prefix(row, r.slot, n)
        return n
