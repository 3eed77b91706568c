"""Where speculative drafts come from (gpt.speculative): prompt lookup over a sequence's own
prompt and output (`NgramIndex`), the tokens of a request's `prediction`, followed token by
token and re-aligned after the output leaves them, and each source's recent acceptance."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field


class NgramIndex:
    """Where each n-gram (n in [lo, hi]) of a token list occurs: for each, the positions of the
    tokens that followed it, ascending. `extend` indexes tokens as they are appended."""

    def __init__(self, lo: int, hi: int, tokens: Sequence[int] = ()):
        self.lo, self.hi = lo, hi
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], list[int]] = {}
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        toks = self.tokens
        for t in new:
            j = len(toks)  # the n-grams ending just before this token are followed by it
            for n in range(self.lo, min(self.hi, j) + 1):
                self.follows.setdefault(tuple(toks[j - n : j]), []).append(j)
            toks.append(t)

    def find(self, suffix: Sequence[int], *, after: int | None = None, room: int = 1) -> int | None:
        """The position that follows an occurrence of the longest n-gram ending `suffix`: the
        latest occurrence that `room` tokens follow (else the earliest: in a run of one token
        the latest occurrence is the run's own last n-gram, which leaves a draft of one), or
        with `after`, the first at or after that position (else the latest)."""
        for n in range(min(self.hi, len(suffix)), self.lo - 1, -1):
            hits = self.follows.get(tuple(suffix[len(suffix) - n :]))
            if hits:
                if after is not None:
                    i = bisect.bisect_left(hits, after)
                    return hits[i] if i < len(hits) else hits[-1]
                i = bisect.bisect_right(hits, len(self.tokens) - room) - 1
                return hits[max(i, 0)]
        return None


@dataclass
class Acceptance:
    """A row's recent acceptance of one source's drafts: the chance that a drafted token is
    kept, counted with older drafts weighing less."""

    kept: float
    tried: float

    def rate(self) -> float:
        return self.kept / self.tried

    def record(self, drafted: int, matched: int, decay: float = 0.7) -> None:
        # a draft is verified up to its first wrong token: matched kept, then one rejected
        self.kept = decay * self.kept + matched
        self.tried = decay * self.tried + matched + (matched < drafted)


@dataclass
class Drafter:
    """One sequence's draft sources: prompt lookup over its prompt and output, and the tokens
    of its `prediction` (re-aligned after a rejection), with each source's acceptance."""

    lookup: NgramIndex
    prediction: NgramIndex | None = None
    predicted_at: int = 0  # a position in the prediction the output is known to have reached,
    output_at: int = 0  # ... and the output's position there
    drafted_at: tuple[int, int] = (0, 0)  # the last prediction draft's (prediction, output) positions
    seen: int = 0  # output tokens indexed so far
    acceptance: dict[str, Acceptance] = field(default_factory=dict)
    source: str = ""  # of the last draft
    draft_row: int | None = None  # its row in the draft model's cache, when it has one
    # a draft made but not verified, to learn its source's acceptance from the tokens that follow:
    # (output length when drafted, the draft, its source)
    shadow: tuple[int, list[int], str] | None = None

    @classmethod
    def new(cls, ngrams: tuple[int, int], prompt_ids: Sequence[int], prediction: Sequence[int] = ()):
        """`ngrams`: the shortest and longest n-grams prompt lookup matches."""
        pred = NgramIndex(1, ngrams[1], prediction) if prediction else None
        return cls(
            NgramIndex(*ngrams, prompt_ids),
            pred,
            acceptance={
                "ngram": Acceptance(1.0, 2.0),
                "prediction": Acceptance(3.0, 4.0),
                "draft": Acceptance(2.0, 3.0),
            },
        )

    def propose(self, output_ids: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow `output_ids` (the prediction first, then the
        sequence's own text unless a draft model drafts for it); [] when there is no guess."""
        self.lookup.extend(output_ids[self.seen :])
        self.seen = len(output_ids)
        self.source = ""
        if limit <= 0:
            return []
        if self.prediction is not None:
            pred = self.prediction.tokens
            at = self.aligned(output_ids)
            if at is not None and at < len(pred):
                self.drafted_at, self.source = (at, len(output_ids)), "prediction"
                return pred[at : at + limit]
        if self.draft_row is not None:
            return []  # the draft model's proposal comes from Speculator.plan, batched
        toks = self.lookup.tokens
        at = self.lookup.find(toks, room=limit)
        if at is None:
            return []
        self.source = "ngram"
        return toks[at : at + limit]

    def aligned(self, output_ids: Sequence[int]) -> int | None:
        """Where in the prediction the output goes on. While the output follows the prediction,
        right after the tokens it has added since the last known position (checked token by
        token: in a run of repeated tokens an n-gram match can be off by one). Once it has left
        the prediction (a changed, added or dropped span), after an occurrence of the longest
        n-gram ending the output: the first at or after the last known position, else the latest."""
        pred, new = self.prediction.tokens, output_ids[self.output_at :]
        at = self.predicted_at
        if pred[at : at + len(new)] == list(new):
            self.predicted_at, self.output_at = at + len(new), len(output_ids)
            return self.predicted_at
        return self.prediction.find(output_ids, after=at) if output_ids else None

    def shade(self, output_ids: Sequence[int], draft: Sequence[int]) -> None:
        """Keep `draft` (just proposed, not to be verified) to compare with the output to come."""
        if draft and self.shadow is None and self.source:
            self.shadow = (len(output_ids), list(draft), self.source)

    def settle(self, output_ids: Sequence[int]) -> tuple[str, int, int] | None:
        """Once the output has shown how much of the kept draft was right (a wrong token, or all
        of it): count that in its source's acceptance and return (source, drafted, matched)."""
        if self.shadow is None:
            return None
        start, draft, source = self.shadow
        seen = output_ids[start : start + len(draft)]
        matched = next((i for i, (a, b) in enumerate(zip(seen, draft)) if a != b), len(seen))
        if matched == len(seen) < len(draft):
            return None  # right so far, not all of it seen yet
        self.shadow = None
        self.acceptance[source].record(len(draft), matched)
        return source, len(draft), matched

    def rate(self) -> float:
        return self.acceptance[self.source].rate() if self.source else 0.0

    def sources(self) -> list[str]:
        """The sources this sequence's drafts can come from."""
        own = "draft" if self.draft_row is not None else "ngram"
        return [own, "prediction"] if self.prediction is not None else [own]

    def record(self, drafted: int, matched: int) -> None:
        if self.source and drafted:
            self.acceptance[self.source].record(drafted, matched)
            if self.source == "prediction":
                at, out = self.drafted_at
                self.predicted_at, self.output_at = at + matched, out + matched
