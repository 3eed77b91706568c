"""Speculative decoding that never changes the output.

A draft (tokens guessed cheaply, from the sequence's own prompt and output, or from a
`prediction` the caller supplies) is appended to a sequence's last token, and the model reads
all of them in one forward. While a step is bound by reading the weights (small batches), that
costs little more than one token. The logits at each position are then decoded exactly as a
step without speculation would decode them, through the sequence's own `SequenceDecoder`
(sampler and random generator, penalties, constraint, stop strings, budget), one position at a
time: the token chosen at a position is kept, and the next position counts only if that token
is the drafted one. Each position draws the one uniform number it would have drawn anyway, and
no number is drawn for a position that is not reached; so greedy and seeded outputs are the
tokens decoding one at a time gives. The cache is then cut back to the tokens that were kept.

Whether to speculate, and how far, is decided per step (`Speculator.plan`) from each row's
recent acceptance and from the measured cost of wider forwards (`StepCosts`): a large batch is
bound by arithmetic, not by reading weights, and there a wider forward costs what it computes.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decoding import SequenceDecoder, decode_tokens
from .drafting import Acceptance, Drafter, NgramIndex  # noqa: F401  (NgramIndex re-exported)
from .step_costs import StepCosts, _bucket  # noqa: F401  (re-exported)
from .verification import Verified, speculative_step, verify  # noqa: F401  (re-exported)

MODES = ("auto", "ngram", "draft", "off")
BATCH_DRAFT_MAX = 16  # llama.cpp's --draft-max default


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. `mode`:
    - "auto" (default): predictions, and the draft model when there is one, else prompt lookup,
      on the steps where the measured costs say it is faster;
    - "ngram": always draft from predictions and prompt lookup when they have a guess;
    - "draft": always draft from predictions and the draft model;
    - "off": never (a request's `prediction` is then ignored).
    `draft_model`: a smaller GPT with the same tokenizer (gpt.draft_model), or None.
    """

    mode: str = "auto"
    # the longest draft of a sequence decoding alone; rows of a batch of several draft at most
    # BATCH_DRAFT_MAX. A prediction is followed for long runs, and one wider forward costs little
    # more there; in a batch, every row's width multiplies the forward, and trying the wider
    # widths cost more than they won (docs/speculative.md).
    num_tokens: int = 32
    ngram_min: int = 2  # prompt lookup matches the sequence's last n tokens, n from ngram_max down
    ngram_max: int = 4
    draft_model: object = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculative mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.mode == "draft" and self.draft_model is None:
            raise ValueError("speculative mode 'draft' needs a draft model")

    @classmethod
    def of(cls, value: SpeculativeConfig | str | None) -> SpeculativeConfig:
        if isinstance(value, SpeculativeConfig):
            return value
        return cls("off" if value is None else value)

    def longest(self, batch: int) -> int:
        """The longest draft a row may have in a step of `batch` rows."""
        return self.num_tokens if batch == 1 else min(self.num_tokens, BATCH_DRAFT_MAX)

    @property
    def ngrams(self) -> tuple[int, int]:
        return self.ngram_min, self.ngram_max

    @property
    def on(self) -> bool:
        return self.mode != "off"


def expected_tokens(rate: float, drafted: int) -> float:
    """Tokens one verified step is expected to give with a draft of `drafted` tokens, each kept
    with chance `rate` while all before it were: 1 + rate + rate**2 + ... + rate**drafted."""
    return drafted + 1.0 if rate >= 1.0 else (1.0 - rate ** (drafted + 1)) / (1.0 - rate)


def _sampled(decoder: SequenceDecoder) -> bool:
    return decoder.params.temperature > 0


class Speculator:
    """The batch-level decision: which rows get drafts, and how long, at each step."""

    # auto speculates where it expects at least this many times plain decoding's speed: for one
    # row, and for several. Served, several rows' speculation cost more than the engine measured
    # of its forwards (then eager, beside compiled plain steps, on the cores that stream the
    # output): at 1.05, 32 clients lost up to a quarter of their rate to it.
    margin, margin_rows = 1.05, 1.3
    # steps between re-measurements of a draft length judged too slow: doubled after each one
    # that confirms it, back to the first after auto speculates again
    retry_first, retry_most = 64, 1024

    def __init__(self, config: SpeculativeConfig, costs: StepCosts | None = None, draft=None):
        self.config = config
        self.costs = costs if costs is not None else StepCosts()
        self.draft = draft if config.mode != "ngram" else None  # a gpt.draft_model.DraftModel
        self.draft_seconds: float | None = None  # one step of the draft model, running average
        # per batch-size bucket, as the costs are: steps on which auto did not speculate since
        # the last retry, and the steps between retries (speculating at one batch size says
        # nothing of another: one stream's success had a batch of 32 retry every 64 steps)
        self.declined: dict[int, int] = {}
        self.retry_every: dict[int, int] = {}
        # each source's acceptance over all rows lately, apart for sampled and greedy rows (a
        # sampled row keeps far fewer drafted tokens): a new row's starting guess for its own,
        # so that rows whose drafts are right are speculated for from the start (and, with a
        # fixed guess, rows never tried never showed that their drafts were right)
        self.acceptance = {sampled: Drafter.new(config.ngrams, []).acceptance for sampled in (False, True)}

    def drafter(self, decoder: SequenceDecoder) -> Drafter | None:
        """A sequence's draft sources, or None where speculation is off or cannot apply."""
        if not self.config.on or decoder.params.num_beams > 1:
            return None
        if (
            self.config.mode == "auto"
            and _sampled(decoder)
            and not decoder.prediction_ids
            and self.draft is None
        ):
            # prompt lookup only: auto leaves sampled rows to plain decoding. They keep few of
            # those drafts, and their verification (sampling every position) costs more than
            # the step costs learned with greedy rows say: with them, every benchmark run of
            # sampling lost to plain decoding (docs/speculative.md, "When it pays").
            return None
        dr = Drafter.new(self.config.ngrams, decoder.prompt_ids, decoder.prediction_ids)
        for source, seen in self.acceptance[_sampled(decoder)].items():
            dr.acceptance[source] = Acceptance(2.0 * seen.rate(), 2.0)  # worth two drafted tokens
        if self.draft is not None:
            dr.draft_row = self.draft.claim()
        return dr

    def release(self, drafter: Drafter | None) -> None:
        """A finished sequence gives its draft-model row back."""
        if drafter is not None and drafter.draft_row is not None:
            self.draft.release(drafter.draft_row)
            drafter.draft_row = None

    def plan(
        self, decoders: Sequence[SequenceDecoder], drafters: Sequence[Drafter | None]
    ) -> list[list[int]]:
        """Each row's draft for this step ([] for none). A row drafts at most what its budget
        can still use (the step gives one token beyond the draft)."""
        if all(dr is None for dr in drafters):  # e.g. only sampled rows, which auto leaves plain
            return [[] for _ in decoders]
        auto = self.config.mode == "auto"
        if auto:
            self._settle(decoders, drafters)
            pays, could = self._could_pay(decoders, drafters)
            if not pays:
                # no draft could pay here, as right as the rows' drafts have lately been: skip
                # verifying; but retry now and then
                b = _bucket(len(decoders))
                self.declined[b] = self.declined.get(b, 0) + 1
                if self.declined[b] < self.retry_every.get(b, self.retry_first):
                    if could:  # right drafts would pay: keep proposing, to see if they become so
                        self._shade(decoders, drafters)
                    return [[] for _ in decoders]
        guesses, rooms = [], []
        cap = self.config.longest(len(decoders))
        for d, dr in zip(decoders, drafters):
            room = min(cap, d.budget - len(d.output_ids) - 1)
            rooms.append(room)
            guesses.append(dr.propose(d.output_ids, room) if dr is not None else [])
        # rows the draft model would draft for: no prediction guess, a row of its cache
        drafting = [
            i
            for i, (g, dr) in enumerate(zip(guesses, drafters))
            if not g and dr is not None and dr.draft_row is not None and rooms[i] > 0
        ]
        for i in drafting:
            drafters[i].source = "draft"
        lengths = [rooms[i] if i in drafting else len(g) for i, g in enumerate(guesses)]
        longest = max(lengths, default=0)
        if longest == 0:
            return guesses
        rates = [dr.rate() if dr is not None else 0.0 for dr in drafters]
        B = len(decoders)
        if self.config.mode in ("ngram", "draft"):
            best = longest
        else:  # the draft length that gives the most tokens per unit of time; 0 = do not speculate
            # plain decoding wins unless a draft promises clearly more: the estimates are noisy
            best, best_speed = 0, B * self._margin(B)
            step = self.costs.step(B)
            per_draft = (self.draft_seconds or 0.0) / step if drafting and step else 0.0
            runner_up, runner_up_speed = 0, 0.0
            top = min(longest, self.costs.widest_to_try(B) - 1)
            relative = self.costs.relatives(B, range(2, top + 2))
            for D in range(1, top + 1):
                tokens = sum(expected_tokens(r, min(n, D)) for r, n in zip(rates, lengths))
                speed = tokens / (relative[D + 1] + per_draft * D)
                if speed > best_speed:
                    best, best_speed = D, speed
                if speed > runner_up_speed:
                    runner_up, runner_up_speed = D, speed
            b = _bucket(B)
            if best:
                self.retry_every[b] = self.retry_first
            else:  # now and then measure the likeliest draft length again: costs drift
                self.declined[b] = self.declined.get(b, 0) + 1
                every = self.retry_every.get(b, self.retry_first)
                if self.declined[b] >= every:
                    best, self.declined[b] = runner_up, 0
                    self.retry_every[b] = min(2 * every, self.retry_most)
                else:
                    self._shade(decoders, drafters, guesses)
        if drafting and best:
            with Timer() as t:
                seqs = [decoders[i].prompt_ids + decoders[i].output_ids for i in drafting]
                proposed = self.draft.propose([drafters[i].draft_row for i in drafting], seqs, best)
            seconds = t.seconds / best
            self.draft_seconds = (
                seconds if self.draft_seconds is None else 0.7 * self.draft_seconds + 0.3 * seconds
            )
            for i, g in zip(drafting, proposed):
                guesses[i] = g[: rooms[i]]
        return [g[:best] for g in guesses]

    def _settle(self, decoders, drafters) -> None:
        """Count the drafts kept unverified (`_shade`) whose outcome the output now shows."""
        for d, dr in zip(decoders, drafters):
            if dr is not None and dr.shadow is not None:
                settled = dr.settle(d.output_ids)
                if settled is not None:
                    source, n, m = settled
                    self.acceptance[_sampled(d)][source].record(n, m, decay=0.98)

    def _shade(self, decoders, drafters, guesses=None) -> None:
        """On a step that does not speculate, propose each row's draft anyway (prompt lookup and
        predictions, a dictionary lookup; not the draft model) and keep it unverified: the tokens
        the step and the next ones give tell whether it was right, so a row whose output starts
        repeating its prompt or itself is seen to be worth speculating for at no forward's cost
        (otherwise only a retry, every 64 steps or more, would find out). Greedy rows only: a
        sampled row's drafts are seldom right, and a short lucky run of them, counted, had it
        verify drafts that did not pay (the open workload of benchmarks/speculative.py).
        `guesses`: the rows' drafts where this step has proposed them already."""
        cap = self.config.longest(len(decoders))
        for i, (d, dr) in enumerate(zip(decoders, drafters)):
            if dr is None or dr.shadow is not None or dr.draft_row is not None or _sampled(d):
                continue
            if guesses is None:
                room = min(cap, d.budget - len(d.output_ids) - 1)
                dr.shade(d.output_ids, dr.propose(d.output_ids, room))
            else:
                dr.shade(d.output_ids, guesses[i])

    def _could_pay(self, decoders, drafters) -> tuple[bool, bool]:
        """Whether some draft length could beat plain decoding by the margin if each row drafted
        all it may, from its best source at that source's recent acceptance (a draft model's
        time not counted), by the measured costs; and whether it could with drafts that are
        always right."""
        B = len(decoders)
        if self.costs.step(B) is None:
            return False, False  # plain steps are measured first
        widest = min(self.config.longest(B) + 1, self.costs.widest_to_try(B))
        margin = self._margin(B)
        relative = self.costs.relatives(B, range(2, widest + 1))
        if all(w < margin * relative[w] for w in relative):
            return False, False  # not even with drafts that are always right
        rows = [
            (
                max(dr.acceptance[s].rate() for s in dr.sources()),
                max(0, min(d.budget - len(d.output_ids) - 1, widest - 1)),
            )
            for d, dr in zip(decoders, drafters)
            if dr is not None
        ]
        plain = B - len(rows)
        # First a bound, in one pass over the rows: each row drafting all it may, at the cheapest
        # wider forward. Rows whose drafts are seldom right (sampling) end the check here; the
        # full one below costs a pass per width, a step's few percent at 32 rows.
        most = plain + sum(expected_tokens(r, room) for r, room in rows)
        if most <= margin * B * min(relative.values()):
            return False, True
        for w in range(2, widest + 1):
            tokens = plain + sum(expected_tokens(r, min(room, w - 1)) for r, room in rows)
            if tokens > margin * B * relative[w]:
                return True, True
        return False, True

    def _margin(self, batch: int) -> float:
        return self.margin if batch == 1 else self.margin_rows

    def record(self, decoders, drafters, result: Verified) -> None:
        """After a verified step: each row's acceptance, and its prediction's kept and rejected
        tokens (counted on the decoder, and on the step's piece)."""
        for dec, dr, piece, n, m in zip(decoders, drafters, result.pieces, result.drafted, result.matched):
            if dr is None or not n:
                continue
            if dr.source == "prediction":
                dec.prediction_tokens[0] += m
                dec.prediction_tokens[1] += n - m
                piece.accepted_prediction_tokens, piece.rejected_prediction_tokens = dec.prediction_tokens
            self.acceptance[_sampled(dec)][dr.source].record(n, m, decay=0.98)
            dr.record(n, m)


@torch.inference_mode()
def decode_step(model, cache, rows, decoders, drafters, spec: Speculator | None):
    """One decode step of the rows' sequences: their last tokens, with drafts where `spec`
    decides to speculate. Returns each row's piece, and the `Verified` record of a speculative
    step (None for a plain one); the step's time goes into the measured costs."""
    drafts = spec.plan(decoders, drafters) if spec is not None else []
    with Timer() as t:
        if any(drafts):
            verified = speculative_step(model, cache, rows, decoders, drafts)
            spec.record(decoders, drafters, verified)
            pieces = verified.pieces
        else:
            verified = None
            tokens = torch.tensor([[d.last_token] for d in decoders], dtype=torch.long, device=model.device)
            pieces = decode_tokens(model.step(tokens, cache, rows=rows), decoders)
    if spec is not None:
        spec.costs.record(len(decoders), 1 + max(map(len, drafts), default=0), t.seconds)
    return pieces, verified


class Timer:
    """Times a step's forward and decoding for `StepCosts` (on a GPU the decoding's .tolist()
    waits for the forward)."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


_costs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its StepCosts


def speculator_for(
    model, speculative: SpeculativeConfig | str | None, rows: int = 1, max_len: int = 0, vocab_size: int = 0
) -> Speculator | None:
    """A Speculator for `model` in the given mode (None when off); the measured step costs are
    kept with the model, so that later generations start from them. With a draft model, its
    cache has `rows` rows of `max_len` tokens; `vocab_size`: the tokenizer's."""
    config = SpeculativeConfig.of(speculative)
    if not config.on:
        return None
    costs = _costs.get(model)
    if costs is None:
        costs = _costs[model] = StepCosts()
    draft = None
    if config.draft_model is not None and config.mode != "ngram":
        from .draft_model import DraftModel

        if model.config.is_seq2seq:
            raise ValueError("a draft model drafts for a GPT, not an encoder-decoder")
        if config.draft_model.config.vocab_size != model.config.vocab_size:
            raise ValueError("the draft model's vocabulary is not the model's: it must share the tokenizer")
        draft = DraftModel(config.draft_model, rows, max_len, vocab_size)
    return Speculator(config, costs, draft)
