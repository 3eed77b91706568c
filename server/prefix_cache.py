"""Which tokens each KV-cache row holds, so a new request can start from a row that already has
its prompt's beginning (a chat's earlier turns, a shared system prompt, the other `n` choices).

The scheduler owns the rows; this index only remembers their contents and answers two
questions: which row shares the longest token prefix with a prompt, and which free row is the
cheapest to overwrite (least recently used). A row's contents are:
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
