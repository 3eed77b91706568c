"""Which replica has seen which prompt prefixes: the memory behind prefix-aware routing.

A prompt's text is cut into blocks of `block_chars` characters, and each block is named by a
hash chained through the blocks before it, so one hash stands for the whole prefix up to that
block (how vLLM names KV-cache blocks and llm-d routes on them). A replica that served a prompt
holds every one of its prefix hashes; the replica holding the longest run of a new prompt's
hashes is the one most likely to have its keys and values in its prefix cache. Text rather than
tokens, because the router runs before (and apart from) the tokenizer: a shared text prefix is
a shared token prefix up to the last block boundary or so.

The index is bounded: the least recently used hashes are dropped past `max_blocks`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable

BLOCK_CHARS = 64
MAX_BLOCKS = 200_000


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """One chained hash per complete block of `text` (a trailing partial block is not named:
    the next turn of a conversation changes it)."""
    hashes, h = [], b""
    data = text.encode("utf-8", "surrogatepass")
    for end in range(block_chars, len(data) + 1, block_chars):
        h = hashlib.blake2b(h + data[end - block_chars : end], digest_size=12).digest()
        hashes.append(h)
    return hashes


class PrefixIndex:
    def __init__(self, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS):
        self.block_chars, self.max_blocks = block_chars, max_blocks
        self._holders: OrderedDict[bytes, set[Hashable]] = OrderedDict()
        self.held: Counter[Hashable] = Counter()  # blocks each replica holds

    def __len__(self) -> int:
        return len(self._holders)

    def longest_match(self, text: str, candidates: Iterable[Hashable]) -> tuple[dict[Hashable, int], int]:
        """For each candidate holding at least the first block, how many characters of `text`'s
        prefix it holds; and the number of complete blocks `text` has."""
        hashes = prefix_hashes(text, self.block_chars)
        alive = set(candidates)
        matched: dict[Hashable, int] = {}
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            alive &= holders if holders else set()
            if not alive:
                break
            self._holders.move_to_end(h)
            for r in alive:
                matched[r] = (i + 1) * self.block_chars
        return matched, len(hashes)

    def insert(self, text: str, replica: Hashable) -> None:
        for h in prefix_hashes(text, self.block_chars):
            holders = self._holders.get(h)
            if holders is None:
                self._holders[h] = holders = set()
            else:
                self._holders.move_to_end(h)
            if replica not in holders:
                holders.add(replica)
                self.held[replica] += 1
        while len(self._holders) > self.max_blocks:
            _, holders = self._holders.popitem(last=False)
            self.held.subtract(holders)

    def forget(self, replica: Hashable) -> None:
        """A replica that stopped: its cache is gone with it."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            holders = self._holders[h]
            holders.discard(replica)
            if not holders:
                del self._holders[h]
        self.held.pop(replica, None)
