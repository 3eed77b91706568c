"""Sampling parameters and the batched next-token choice.

Every row of a batch carries its own parameters and its own random generator, so what one
request samples never depends on which other requests share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import kernels
from .limits import RequestError

if TYPE_CHECKING:
    from .constraints import Constraint

MAX_LOGPROBS = 20  # alternatives reported per token at most (OpenAI's limit)


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults follow OpenAI's API: temperature 1, no filtering.

    Every rule about these fields is checked here, once (`validate`), with one message per rule;
    a server reports the `gpt.RequestError` under its own field names (`RequestError.renamed`)."""

    max_new_tokens: int = 64  # 0: read (and score) the prompt, generate nothing
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: the smallest set whose probability reaches p
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely)
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's semantics, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: Sequence[str] = ()  # empty strings are dropped, repeats kept once
    stop_token_ids: Sequence[int] = ()  # these tokens end the sequence like end-of-text (not shown)
    min_tokens: int = 0  # end-of-text and stop_token_ids cannot be chosen before this many tokens
    ignore_eos: bool = False  # keep going past end-of-text
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = logprob / length ** length_penalty
    logprobs: int = 0  # also report this many most likely alternatives per token
    prompt_logprobs: int | None = None  # also score the prompt, with this many alternatives (a server's)
    # Structured output: the output must match this JSON schema, regex, choice or grammar
    # (gpt.constraints). The sequence ends with "stop" once the match is complete.
    constraint: Constraint | None = None
    allowed_token_ids: Sequence[int] | None = None  # only these tokens may be chosen (vLLM's)
    bad_words: Sequence[str] = ()  # never output these words, with or without a leading space (vLLM's)
    # Predicted output (OpenAI's `prediction`): text, or token ids, that the output is expected to
    # repeat for the most part (a file rewritten with a few changes). Speculative decoding drafts
    # from it (gpt.speculative); it never changes which tokens are chosen, only how fast.
    prediction: str | Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(dict.fromkeys(s for s in (self.stop or ()) if s))
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = tuple(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = tuple(self.bad_words or ())
        if self.prediction is not None and not isinstance(self.prediction, str):
            self.prediction = tuple(self.prediction)
        self.validate()

    def validate(self, vocab_size: int | None = None, *, seq2seq: bool = False) -> None:
        """Raise a gpt.RequestError naming the first field that breaks a rule. With `vocab_size`,
        token ids and top_k are checked against the vocabulary; `seq2seq`: the model is an
        encoder-decoder, whose prompt is a source it does not predict (no prompt_logprobs)."""

        def need(cond: bool, param: str, why: str, code: str = "invalid_value") -> None:
            if not cond:
                raise RequestError.of(param, why, code)

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def token(t) -> bool:
            return integer(t) and t >= 0 and (vocab_size is None or t < vocab_size)

        vocab = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocabulary size)"
        need(
            integer(self.max_new_tokens) and self.max_new_tokens >= 0,
            "max_new_tokens",
            f"must be an integer >= 0, got {self.max_new_tokens!r}",
        )
        need(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be >= 0, got {self.temperature}",
        )
        need(integer(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if vocab_size is not None:
            need(
                self.top_k <= vocab_size, "top_k", f"is {self.top_k}, more than the vocabulary ({vocab_size})"
            )
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        need(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        need(
            integer(self.num_beams) and self.num_beams >= 1,
            "num_beams",
            f"must be an integer >= 1, got {self.num_beams!r}",
        )
        if self.num_beams > 1:
            need(
                self.max_new_tokens >= 1,
                "max_new_tokens",
                "0 generates nothing to search: beam search (num_beams > 1) needs at least 1",
                "invalid_combination",
            )
        need(
            math.isfinite(self.length_penalty), "length_penalty", f"must be finite, got {self.length_penalty}"
        )
        need(
            integer(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            f"must be an integer >= 0, got {self.min_tokens!r}",
        )
        for i, tok in enumerate(self.stop_token_ids):
            need(token(tok), f"stop_token_ids.{i}", f"token id {tok!r} is out of range {vocab}")
        for tok, bias in (self.logit_bias or {}).items():
            need(token(tok), "logit_bias", f"token id {tok!r} is out of range {vocab}")
            need(-100 <= bias <= 100, f"logit_bias.{tok}", f"must be in [-100, 100], got {bias}")
        need(
            integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
        )
        if self.allowed_token_ids is not None:
            need(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty")
            for i, tok in enumerate(self.allowed_token_ids):
                need(token(tok), f"allowed_token_ids.{i}", f"token id {tok!r} is out of range {vocab}")
        if self.prediction is not None:
            pred = self.prediction
            need(
                isinstance(pred, str) or all(token(t) for t in pred),
                "prediction",
                f"must be text or a list of token ids in {vocab}",
            )
            need(
                self.num_beams == 1,
                "prediction",
                "beam search (num_beams > 1) does not speculate; a prediction cannot apply",
                "invalid_combination",
            )
        for i, word in enumerate(self.bad_words):
            need(isinstance(word, str) and word != "", f"bad_words.{i}", "must be a non-empty string")
        if self.constraint is not None:
            from .constraints import Constraint

            need(
                isinstance(self.constraint, Constraint),
                "constraint",
                "must be a gpt.constraints.Constraint (Constraint.json_schema, .regex, .choice, .grammar)",
            )
            need(
                self.num_beams == 1,
                self.constraint.param,
                "beam search (num_beams > 1) cannot be constrained; sample or decode greedily",
                "invalid_combination",
            )
            need(
                not self.ignore_eos,
                "ignore_eos",
                "a constrained output ends where its constraint does; ignore_eos cannot apply",
                "invalid_combination",
            )
        if self.prompt_logprobs is not None:
            need(
                not seq2seq,
                "prompt_logprobs",
                "prompt logprobs need a decoder-only model: an encoder-decoder's prompt is its "
                "source, which it does not predict",
                "invalid_combination",
            )
            need(
                integer(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def new_generator(self, device="cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


@dataclass
class RowState:
    """What sampling needs to remember about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized

    @classmethod
    def new(cls, params: SamplingParams, prompt_ids: Sequence[int], device="cpu") -> RowState:
        return cls(params, list(prompt_ids), params.new_generator(device))

    @property
    def needs_history(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0

    @property
    def adjusted(self) -> bool:
        """Whether apply_penalties changes this row's logits at this step."""
        p = self.params
        return bool(
            self.needs_history
            or p.logit_bias
            or len(self.output_ids) < p.min_tokens
            or p.allowed_token_ids is not None
            or self.bad_words_ids
        )

    def banned(self) -> list[int]:
        """Tokens that would complete a bad word now: a one-token word always, a longer one when
        the output ends with all of it but its last token."""
        out = self.output_ids
        n = len(out)
        return [w[-1] for w in self.bad_words_ids if n >= len(w) - 1 and out[n - len(w) + 1 :] == w[:-1]]


def apply_penalties(logits: Tensor, row: RowState, eot: int | None = None) -> Tensor:
    """Repetition, presence and frequency penalties, logit bias, min_tokens (end-of-text `eot`
    and the stop tokens masked while the output is shorter), allowed_token_ids and bad words on
    one row's logits (V,)."""
    p = row.params
    if p.allowed_token_ids is not None:
        keep = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=logits.device)
        kept = logits[keep]
        logits.fill_(float("-inf"))
        logits[keep] = kept
    banned = row.banned() if row.bad_words_ids else []
    if banned:
        logits[torch.tensor(banned, dtype=torch.long, device=logits.device)] = float("-inf")
    if len(row.output_ids) < p.min_tokens:
        ends = [t for t in p.stop_token_ids if t < logits.shape[-1]]
        if eot is not None and not p.ignore_eos and eot < logits.shape[-1]:
            ends.append(eot)
        if ends:
            logits[torch.tensor(ends, dtype=torch.long, device=logits.device)] = float("-inf")
    if p.repetition_penalty != 1:
        seen = torch.tensor(
            sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long, device=logits.device
        )
        if len(seen):
            s = logits[seen]
            # transformers: divide positive logits, multiply negative ones, so both become less likely
            logits[seen] = torch.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(
            torch.tensor(row.output_ids, device=logits.device), minlength=logits.shape[-1]
        )[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude, each row with its own settings.
    logits (B, V) already divided by temperature; top_k (B,) with 0 = off; top_p, min_p (B,)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = rank >= k
    # nucleus: drop a token once the mass before it already reaches p (the top token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _uniforms(rows: Sequence[RowState], device) -> Tensor:
    """One U(0,1) per row, from the row's own generator when it has a seed."""
    return torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)


def sample(logits: Tensor, rows: Sequence[RowState], eot: int | None = None) -> Tensor:
    """Choose the next token of every row: (B, V) logits -> (B,) token ids. Rows' output_ids are
    not updated here (the caller appends the chosen tokens once it accepts them). `eot`: the
    end-of-text token, which min_tokens holds back."""
    logits = logits.float()
    adjusted = [r.adjusted for r in rows]
    if any(adjusted):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if adjusted[i]:
                apply_penalties(logits[i], r, eot)
    tokens = kernels.argmax(logits)  # PyTorch's argmax over a batch of vocabularies is slow on a CPU
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled:
        return tokens
    dev = logits.device
    idx = torch.tensor(sampled, device=dev)
    ps = [rows[i].params for i in sampled]
    temp = torch.tensor([p.temperature for p in ps], device=dev)[:, None]
    sub = logits[idx] / temp
    if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in ps):
        sub = filter_logits(
            sub,
            torch.tensor([p.top_k for p in ps], device=dev),
            torch.tensor([p.top_p for p in ps], device=dev),
            torch.tensor([p.min_p for p in ps], device=dev),
        )
    # Inverse-CDF sampling with one uniform per row: the choice depends only on this row's
    # distribution and its generator, not on the other rows in the batch.
    cdf = sub.softmax(dim=-1).cumsum(dim=-1)
    u = _uniforms([rows[i] for i in sampled], dev)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)[:, 0]
    # never land on a masked token through float rounding at the top end of the cdf
    probs_at = sub.gather(1, choice[:, None])[:, 0]
    choice = torch.where(torch.isfinite(probs_at), choice, sub.argmax(dim=-1))
    tokens[idx] = choice
    return tokens


def token_logprobs(logits: Tensor, tokens: Tensor, top_n: int = 0):
    """The model's log-probability of each chosen token (B,), and the top_n alternatives
    ((B, n) values, (B, n) ids) when asked, from the unprocessed distribution."""
    logits = logits.float()
    # log p = logit - logsumexp(logits): one reduction, without writing a (B, V) log_softmax
    lse = kernels.logsumexp(logits)[:, None]
    chosen = (logits.gather(1, tokens[:, None]) - lse)[:, 0]
    if top_n:
        vals, ids = logits.topk(top_n, dim=-1)
        return chosen, vals - lse, ids
    return chosen, None, None
