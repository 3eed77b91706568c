"""How well a model predicts held-out text: loss per token, perplexity and bits per byte.

Per-token loss cannot compare models with different tokenizers (a byte model's tokens are
easier to guess than a BPE model's); loss per byte of UTF-8 text can, so that is the headline.

Each document is scored from its first token (predicted from end-of-text, the separator the
trainer puts between documents) to its last. A document longer than the model's context is
scored in overlapping windows: each window predicts `stride` new tokens with the rest of the
context before them, like lm-evaluation-harness's rolling log-likelihood with an overlap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .chunked_loss import lm_cross_entropy
from .tokenizer import Tokenizer

IGNORE = -100  # cross_entropy's ignore_index: padded target positions add no loss


@dataclass
class Score:
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    bytes: int
    documents: int

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nll / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def nats_per_byte(self) -> float:
        return self.nll / max(1, self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nats_per_byte / math.log(2)

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "nats_per_byte": self.nats_per_byte,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


Window = tuple[list[int], list[int], int]  # inputs, targets, how many trailing targets count


def windows(ids: Sequence[int], start: int, block: int, stride: int) -> list[Window]:
    """Cover every id of one document with windows of at most `block` inputs: the first scores
    up to `block` targets, each next one `stride` new targets after `block - stride` of context."""
    seq = [start, *ids]
    out, done = [], 0
    while done < len(ids):
        end = min(done + (stride if done else block), len(ids))
        lo = max(0, end - block)
        out.append((seq[lo:end], seq[lo + 1 : end + 1], end - done))
        done = end
    return out


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    *,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Score:
    """Score decoder-only `model` on `texts` (each one document)."""
    from tqdm import tqdm

    if model.config.is_seq2seq:
        raise ValueError("score_texts scores a decoder-only GPT; an encoder-decoder is scored on pairs")
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    if not 1 <= stride <= block:
        raise ValueError(f"stride must be in [1, block size {block}], got {stride}")
    texts = list(texts)
    nll, n_tokens, n_bytes, pending = 0.0, 0, 0, []
    device = next(model.parameters()).device
    bar = tqdm(
        total=sum(len(t.encode("utf-8")) for t in texts),
        unit="B",
        unit_scale=True,
        desc="scoring",
        disable=not progress,
        leave=False,
    )

    def flush() -> float:
        width = max(len(inp) for inp, _, _ in pending)
        x = torch.full((len(pending), width), tokenizer.eot_token, dtype=torch.long)
        y = torch.full((len(pending), width), IGNORE, dtype=torch.long)
        for r, (inp, tgt, n_new) in enumerate(pending):
            x[r, : len(inp)] = torch.tensor(inp)
            y[r, len(tgt) - n_new : len(tgt)] = torch.tensor(tgt[len(tgt) - n_new :])
        hidden = model(x.to(device), hidden=True)
        pending.clear()
        return lm_cross_entropy(model, hidden, y.to(device), ignore_index=IGNORE, reduction="sum").item()

    with bar:
        for text in texts:
            ids = tokenizer.encode(text)
            n_tokens += len(ids)
            n_bytes += len(text.encode("utf-8"))
            for w in windows(ids, tokenizer.eot_token, block, stride):
                pending.append(w)
                if len(pending) == batch_size:
                    nll += flush()
            bar.update(len(text.encode("utf-8")))
        if pending:
            nll += flush()
    return Score(nll=nll, tokens=n_tokens, bytes=n_bytes, documents=len(texts))


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], bos: int, eos: int):
    """(src, src_mask, tgt_in, tgt_out), each (B, T), right-padded: the decoder reads
    [bos] + target and predicts target + [eos]; padding is masked in the encoder and ignored
    by the loss. Training batches pairs this way too."""
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs) + 1
    src = torch.zeros(len(pairs), S, dtype=torch.long)
    src_mask = torch.zeros(len(pairs), S, dtype=torch.bool)
    tgt_in = torch.zeros(len(pairs), T, dtype=torch.long)
    tgt_out = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, : len(s)], src_mask[i, : len(s)] = torch.tensor(s), True
        tgt_in[i, : len(t) + 1] = torch.tensor([bos, *t])
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, eos])
    return src, src_mask, tgt_in, tgt_out


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Score:
    """Score encoder-decoder `model` on (source, target) pairs: the target and its end-of-text,
    teacher-forced, given the source. Bytes are the targets' (end-of-text has none)."""
    from tqdm import tqdm

    if not model.config.is_seq2seq:
        raise ValueError("score_pairs scores an encoder-decoder; a GPT is scored on texts")
    device = next(model.parameters()).device
    limit = model.config.block_size
    nll, n_tokens, n_bytes = 0.0, 0, 0
    for lo in tqdm(
        range(0, len(pairs), batch_size), desc="scoring", unit="batch", disable=not progress, leave=False
    ):
        chunk = pairs[lo : lo + batch_size]
        enc = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in chunk]
        for i, (s, t) in enumerate(enc):
            if not s or len(s) > limit or len(t) + 1 > limit:
                raise ValueError(
                    f"pair {lo + i + 1}: the source must have 1 to {limit} tokens and the target "
                    f"at most {limit - 1} (it has {len(s)} and {len(t)})"
                )
        src, mask, tgt_in, tgt_out = collate_pairs(enc, model.start_token, tokenizer.eot_token)
        hidden = model(src.to(device), tgt_in.to(device), mask.to(device), hidden=True)
        nll += lm_cross_entropy(
            model, hidden, tgt_out.to(device), ignore_index=IGNORE, reduction="sum"
        ).item()
        n_tokens += int((tgt_out != IGNORE).sum())
        n_bytes += sum(len(t.encode("utf-8")) for _, t in chunk)
    return Score(nll=nll, tokens=n_tokens, bytes=n_bytes, documents=len(pairs))
