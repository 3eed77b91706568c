"""A draft model: a smaller model with the same tokenizer proposing drafts for speculative
decoding (gpt.speculative), greedily, from a KV cache of its own.

Each sequence holds one row of the draft's cache. Before proposing, a row is brought up to date
with what the sequence really is: the cache keeps the longest prefix it holds in common with the
sequence (its own proposals included, as far as they were kept) and is fed the rest, so nothing
has to tell it which drafted tokens were rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decoding import in_vocabulary
from .tokenizer import Tokenizer

PROBE = "def draft(x):\n    return x ** 2  # héllo, wörld\n"


class DraftModelError(ValueError):
    """A draft model that cannot draft for the target (another tokenizer, a short context)."""


class DraftModel:
    def __init__(self, model, rows: int, max_len: int, vocab_size: int):
        """`rows` cache rows of up to `max_len` tokens (at most the draft's context); it proposes
        only the tokenizer's `vocab_size` ids."""
        if model.config.is_seq2seq:
            raise DraftModelError("a draft model must be a decoder-only GPT")
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.max_len = min(max_len, model.config.block_size)
        self.cache = model.new_cache(rows, max_len=self.max_len)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # what each cache row holds
        self.agreed = [0] * rows  # tokens of that known to be the sequence's (it only grows)
        self.free = list(range(rows - 1, -1, -1))

    def claim(self) -> int | None:
        """A cache row for a new sequence (None when all are taken: it drafts otherwise)."""
        if not self.free:
            return None
        row = self.free.pop()
        self.tokens[row], self.agreed[row] = [], 0
        self.cache.reset(slice(row, row + 1))
        return row

    def release(self, row: int) -> None:
        self.free.append(row)

    @torch.inference_mode()
    def propose(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        """`k` greedy tokens after each sequence (its prompt and output so far), from its row;
        [] for a sequence that would not fit in the draft's context."""
        fits = [i for i, s in enumerate(seqs) if len(s) + k <= self.max_len]
        out: list[list[int]] = [[] for _ in seqs]
        if not fits or k <= 0:
            return out
        rows_t = torch.tensor([rows[i] for i in fits])
        feeds = []
        for i in fits:
            row, seq, held = rows[i], seqs[i], self.tokens[rows[i]]
            limit = min(len(held), len(seq) - 1)  # at least the last token is fed
            keep = min(self.agreed[row], limit)
            while keep < limit and held[keep] == seq[keep]:
                keep += 1
            self.cache.lengths[row] = keep
            feeds.append(list(seq[keep:]))
            self.tokens[row], self.agreed[row] = list(seq), len(seq)
        width = max(len(f) for f in feeds)
        ids = torch.zeros(len(fits), width, dtype=torch.long)
        for j, f in enumerate(feeds):
            ids[j, : len(f)] = torch.tensor(f)
        dev = self.model.device
        n = torch.tensor([len(f) for f in feeds])
        logits = self.model.step(ids.to(dev), self.cache, rows=rows_t, n_tokens=n)
        for step in range(k):
            nxt = in_vocabulary(logits, self.vocab_size).argmax(dim=-1)
            for j, t in enumerate(nxt.tolist()):
                out[fits[j]].append(t)
            if step == k - 1:
                break
            logits = self.model.step(nxt[:, None], self.cache, rows=rows_t)
            for i in fits:
                self.tokens[rows[i]].append(out[i][-1])
        return out


def check_tokenizers(draft: Tokenizer, target: Tokenizer) -> None:
    """DraftModelError unless the draft's tokenizer is the target's: otherwise the same ids would
    mean different text, and no draft would ever be kept."""
    same = (
        draft.vocab_size == target.vocab_size
        and draft.eot_token == target.eot_token
        and draft.encode(PROBE) == target.encode(PROBE)
    )
    if not same:
        raise DraftModelError(
            f"its tokenizer ({draft.vocab_size} ids) is not the model's ({target.vocab_size} ids): a "
            "draft model must share the model's tokenizer"
        )


def load_draft(path: str, model, tokenizer: Tokenizer, *, device=None, dtype=None, quantize: str = "none"):
    """The draft model at `path` (a checkpoint or a Hugging Face GPT-2 directory), loaded like
    the model it drafts for (device, dtype, quantization); DraftModelError when it cannot be
    loaded or cannot draft for `model`."""
    from .checkpoint import load
    from .quantization import quantize as quantize_model

    try:
        draft, draft_tokenizer = load(path, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        raise DraftModelError(str(e)) from None
    if model.config.is_seq2seq or draft.config.is_seq2seq:
        raise DraftModelError("draft models draft for decoder-only GPTs, and are GPTs themselves")
    check_tokenizers(draft_tokenizer, tokenizer)
    if quantize != "none":
        quantize_model(draft, quantize)
    return draft
