"""Verifying drafts (gpt.speculative): one wider forward over each row's last token and its
draft, then each row's logits decoded position by position through its own `SequenceDecoder`
while the chosen token is the drafted one, and the cache cut back to the kept tokens.

Most rows' choices do not depend on the tokens chosen before them within one step: no penalty
that counts the output, no bad words, no constraint, `min_tokens` already met. For those the
arithmetic of every position is done at once (logsumexp, top alternatives, penalties that do
not depend on history, temperature and filters, the cumulative distribution), and only the
random draws and the decoder's bookkeeping go position by position, each draw made only if its
position is reached. The numbers are the ones `decode_tokens` computes a position at a time.
Other rows go through `decode_tokens` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .decoding import Piece, SequenceDecoder, decode_tokens, in_vocabulary
from .sampling import apply_penalties, filter_logits


@dataclass
class Verified:
    """What one speculative step did to each row."""

    pieces: list[Piece]
    drafted: list[int]
    matched: list[int]  # drafted tokens kept


def verify(logits: torch.Tensor, decoders: Sequence[SequenceDecoder], drafts: Sequence[Sequence[int]]):
    """Decode each row's logits (B, T, V) position by position through its decoder while the
    tokens chosen are the drafted ones: row b's position i predicts what follows its draft's
    first i tokens. One piece per row (its tokens merged), and how many drafted tokens it kept."""
    B = len(decoders)
    pieces: list[Piece | None] = [None] * B
    matched = [0] * B
    vocab = min(d.vocab_size for d in decoders)
    live = []
    for b, (dec, draft) in enumerate(zip(decoders, drafts)):
        if _independent(dec):
            pieces[b], matched[b] = _verify_row(in_vocabulary(logits[b, : len(draft) + 1], vocab), dec, draft)
        else:
            live.append(b)
    for i in range(logits.shape[1]):
        if not live:
            break
        out = decode_tokens(logits[live, i], [decoders[b] for b in live])
        still = []
        for b, piece in zip(live, out):
            pieces[b] = piece if pieces[b] is None else pieces[b].merge(piece)
            draft = drafts[b]
            if piece.finish_reason is None and i < len(draft) and piece.token_ids == [draft[i]]:
                matched[b] += 1
                still.append(b)
        live = still
    return Verified(pieces, [len(d) for d in drafts], matched)  # type: ignore[arg-type]


@torch.inference_mode()
def speculative_step(model, cache, rows, decoders: Sequence[SequenceDecoder], drafts) -> Verified:
    """Feed each row's last token and its draft to the cache `rows` in one forward, verify the
    drafts, and forget the cache positions of the drafted tokens that were not kept."""
    width = 1 + max(len(d) for d in drafts)
    ids = torch.zeros(len(drafts), width, dtype=torch.long)
    for b, (dec, draft) in enumerate(zip(decoders, drafts)):
        ids[b, 0] = dec.last_token
        ids[b, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
    n_tokens = torch.tensor([1 + len(d) for d in drafts])
    logits = model.step(ids.to(model.device), cache, rows=rows, n_tokens=n_tokens, every=True)
    result = verify(logits, decoders, drafts)
    unused = torch.tensor([d - m for d, m in zip(result.drafted, result.matched)])
    cache.rewind(rows, unused)
    return result


def _independent(dec: SequenceDecoder) -> bool:
    """Whether this row's choice at a position does not depend on the tokens chosen before it."""
    s, p = dec.sampler, dec.params
    return (
        dec.constraint is None
        and not s.needs_history
        and not s.bad_words_ids
        and len(s.output_ids) >= p.min_tokens
    )


def _verify_row(logits: torch.Tensor, dec: SequenceDecoder, draft: Sequence[int]) -> tuple[Piece, int]:
    """`verify` for one row whose choices are independent of each other: logits (n, V), n =
    len(draft) + 1 positions. The same operations as `decode_tokens` on each position's row."""
    logits = logits.float()
    n, V = logits.shape
    lse = kernels.logsumexp(logits)
    k = dec.params.logprobs
    if k:
        top_v, top_i = logits.topk(k, dim=-1)
        top_v, top_i = (top_v - lse[:, None]).tolist(), top_i.tolist()
    s, p = dec.sampler, dec.params
    adj = logits
    if s.adjusted:  # logit bias, allowed tokens: the same at every position
        adj = logits.clone()
        for i in range(n):
            apply_penalties(adj[i], s, dec.eot)
    if p.greedy:
        chosen = kernels.argmax(adj).tolist()
    else:
        sub = adj / torch.tensor([p.temperature] * n, device=adj.device)[:, None]
        if p.top_k or p.top_p < 1 or p.min_p > 0:
            sub = filter_logits(
                sub,
                torch.tensor([p.top_k] * n, device=adj.device),
                torch.tensor([p.top_p] * n, device=adj.device),
                torch.tensor([p.min_p] * n, device=adj.device),
            )
        cdf = sub.softmax(dim=-1).cumsum(dim=-1)
    piece, kept = None, 0
    for i in range(n):
        if p.greedy:
            tok = chosen[i]
        else:  # the one draw this position would make without speculation, only once it is reached
            u = torch.rand((), generator=s.generator).to(adj.device)[None, None] * cdf[i : i + 1, -1:]
            c = torch.searchsorted(cdf[i : i + 1], u).clamp(max=V - 1)[:, 0]
            at = sub[i : i + 1].gather(1, c[:, None])[:, 0]
            tok = int(torch.where(torch.isfinite(at), c, sub[i : i + 1].argmax(dim=-1)))
        lp = float(logits[i, tok] - lse[i])
        top = dict(zip(top_i[i], top_v[i])) if k else None
        out = dec.accept(tok, lp, top)
        piece = out if piece is None else piece.merge(out)
        if out.finish_reason is not None or i == len(draft) or tok != draft[i]:
            break
        kept += 1
    return piece, kept
