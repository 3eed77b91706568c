"""Sampling parameters and the batched next-token choice.

Every row of a batch carries its own parameters and its own random generator, so what one
request samples never depends on which other requests share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import kernels


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults follow OpenAI's API: temperature 1, no filtering."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: the smallest set whose probability reaches p
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely)
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's semantics, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()  # these tokens end the sequence like end-of-text (not shown)
    min_tokens: int = 0  # end-of-text and stop_token_ids cannot be chosen before this many tokens
    ignore_eos: bool = False  # keep going past end-of-text
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = logprob / length ** length_penalty
    logprobs: int = 0  # also report this many most likely alternatives per token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or ()) if s]
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
        )
        need(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature}",
        )
        need(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k must be an integer >= 0, got {self.top_k!r}",
        )
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        need(
            -2 <= self.presence_penalty <= 2,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        need(
            -2 <= self.frequency_penalty <= 2,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        need(
            isinstance(self.num_beams, int) and self.num_beams >= 1,
            f"num_beams must be an integer >= 1, got {self.num_beams!r}",
        )
        need(math.isfinite(self.length_penalty), f"length_penalty must be finite, got {self.length_penalty}")
        need(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        for tok in self.stop_token_ids:
            need(
                isinstance(tok, int) and tok >= 0 and (vocab_size is None or tok < vocab_size),
                f"stop_token_ids: token id {tok!r} is out of range",
            )
        need(
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20,
            f"logprobs must be an integer in [0, 20], got {self.logprobs!r}",
        )
        for tok, bias in (self.logit_bias or {}).items():
            need(
                isinstance(tok, int) and tok >= 0 and (vocab_size is None or tok < vocab_size),
                f"logit_bias token id {tok!r} is out of range",
            )
            need(-100 <= bias <= 100, f"logit_bias for token {tok} must be in [-100, 100], got {bias}")
        if vocab_size is not None:
            need(self.top_k <= vocab_size or self.top_k == 0, f"top_k must be <= vocab size {vocab_size}")

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

    @classmethod
    def new(cls, params: SamplingParams, prompt_ids: Sequence[int], device="cpu") -> RowState:
        return cls(params, list(prompt_ids), params.new_generator(device))

    @property
    def needs_history(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def apply_penalties(logits: Tensor, row: RowState, eot: int | None = None) -> Tensor:
    """Repetition, presence and frequency penalties, logit bias and min_tokens (end-of-text `eot`
    and the stop tokens masked while the output is shorter) on one row's logits (V,)."""
    p = row.params
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
    adjusted = [
        r.needs_history or r.params.logit_bias or len(r.output_ids) < r.params.min_tokens for r in rows
    ]
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
