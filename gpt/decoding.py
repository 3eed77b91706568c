"""One sequence's decoding, from a chosen token to a piece of output.

Everything that decides what a generated token becomes lives here, once: the library's
`generate_batch`, beam search and the server's scheduler all hold one `SequenceDecoder` per
sequence and differ only in how they batch the forwards.

    decoders = [SequenceDecoder(tokenizer, prompt_ids, params, budget) ...]
    logits = model.start(prompts, cache)
    pieces = decode_tokens(logits, decoders)   # sample, then end-of-text, stop strings, budget
    ... feed each unfinished decoder's last token back through model.step ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .constraints import ConstraintState, mask_bias
from .sampling import RowState, SamplingParams, sample, token_logprobs
from .streaming import TextStream
from .tokenizer import Tokenizer


@dataclass
class PromptLogprobs:
    """How likely the model found each prompt token, given the tokens before it (a server's `echo`
    with logprobs). One entry per prompt token; the first token's are None, as nothing predicts it.
    From the same unprocessed distribution as generated tokens' logprobs."""

    token_ids: list[int]
    logprobs: list[float | None] = field(default_factory=lambda: [None])
    top_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])  # {} when none asked

    @property
    def complete(self) -> bool:
        return len(self.logprobs) == len(self.token_ids)

    def score(self, logits: Tensor, start: int, top_n: int, vocab_size: int) -> None:
        """Add the logprobs of the prompt tokens that a chunk's logits (n, V) predict: the chunk's
        position j (prompt position start + j) predicts prompt token start + j + 1; the prompt's
        last position predicts the first generated token instead (sampled, not scored here).
        `top_n` alternatives each; `vocab_size`: the tokenizer's (see `in_vocabulary`)."""
        m = min(len(logits), len(self.token_ids) - 1 - start)
        if m <= 0:
            return
        targets = self.token_ids[start + 1 : start + 1 + m]
        targets = torch.tensor(targets, dtype=torch.long, device=logits.device)
        chosen, top_v, top_i = token_logprobs(in_vocabulary(logits[:m], vocab_size), targets, top_n)
        self.logprobs += chosen.tolist()
        if top_n:
            self.top_logprobs += [dict(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
        else:
            self.top_logprobs += [{} for _ in range(m)]


def in_vocabulary(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits (..., V) cut to the tokenizer's `vocab_size` ids. A model whose output layer is
    wider than its tokenizer (a vocabulary padded to a multiple of 64) never chooses, nor
    reports, the ids the tokenizer lacks: everything that samples or scores cuts them off here."""
    return logits[..., :vocab_size]


@dataclass
class Piece:
    """Output of one sequence: a streamed piece, or merged, a whole completion.

    `text` is safe to show (a stop string is never leaked, a UTF-8 character never split), so
    it may lag `token_ids` by a few tokens until they are confirmed."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # the tokens this piece consumed
    logprobs: list[float] = field(default_factory=list)  # chosen-token log-probability, one per token id
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # most likely alternatives, when asked
    # None until the sequence's last piece. The library ends with "stop" (end-of-text, a stop
    # string or a complete constraint), "length" (the token budget) or "error" (the constraint's
    # matcher gave up); the server adds "timeout", "cancelled" and its own "error".
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated up to and including this piece
    cached_tokens: int = 0  # prompt tokens a server took from its prefix cache instead of computing
    # the prompt's own logprobs, when a server was asked for them: on the sequence's first piece
    prompt_logprobs: PromptLogprobs | None = None
    # tokens drafted from the request's prediction (gpt.speculative) that were kept / were not,
    # up to and including this piece (OpenAI's usage.completion_tokens_details)
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    def merge(self, later: Piece) -> Piece:
        """This piece followed by a later one of the same sequence, as one piece."""
        return Piece(
            self.text + later.text,
            self.token_ids + later.token_ids,
            self.logprobs + later.logprobs,
            self.top_logprobs + later.top_logprobs,
            later.finish_reason,
            later.prompt_tokens or self.prompt_tokens,
            later.completion_tokens,
            later.cached_tokens or self.cached_tokens,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            max(self.accepted_prediction_tokens, later.accepted_prediction_tokens),
            max(self.rejected_prediction_tokens, later.rejected_prediction_tokens),
        )

    @property
    def logprob(self) -> float:
        """The log-probability of all of this piece's tokens."""
        return float(sum(self.logprobs))


class SequenceDecoder:
    """The decoding state of one sequence: its sampler state (parameters, random generator,
    history for penalties), its constraint's state when it has one, its text stream
    (incremental detokenizer and stop strings), its token budget and, once it ends, its finish
    reason."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        budget: int | None = None,
        device="cpu",
    ):
        self.params = params
        self.sampler = RowState.new(params, prompt_ids, device)
        self.sampler.bad_words_ids = bad_words_ids(tokenizer, params.bad_words)
        self.constraint: ConstraintState | None = (
            params.constraint.start(tokenizer) if params.constraint is not None else None
        )
        self.stream = TextStream(tokenizer, params.stop)
        self.eot = tokenizer.eot_token
        self.vocab_size = tokenizer.vocab_size
        self.budget = params.max_new_tokens if budget is None else budget
        self.logprobs: list[float] = []  # of each output token
        self.finish_reason: str | None = None
        pred = params.prediction
        self.prediction_ids: list[int] = tokenizer.encode(pred) if isinstance(pred, str) else list(pred or ())
        self.prediction_tokens = [0, 0]  # drafted from the prediction: kept, not kept (gpt.speculative)

    @property
    def prompt_ids(self) -> list[int]:
        return self.sampler.prompt_ids

    @property
    def output_ids(self) -> list[int]:
        return self.sampler.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.sampler.output_ids[-1]

    def accept(self, token: int, logprob: float, top: dict[int, float] | None = None) -> Piece:
        """Append a chosen token; return the piece of output it makes (text may be "" while a
        character or a possible stop string is incomplete), with a finish reason if it ended
        the sequence: end-of-text (unless ignore_eos), a stop string, a complete constraint, or
        the budget. A token the constraint refuses is not taken: a token-less "error" piece."""
        if self.finished:
            raise RuntimeError("this sequence has finished")
        ends = (token == self.eot and not self.params.ignore_eos) or token in self.params.stop_token_ids
        if self.constraint is not None and not ends:
            self.constraint.advance(token)
            if self.constraint.failed:
                # the token leaves the constraint (its matcher gave up, or allowed_token_ids and
                # bad_words left nothing it allows to choose): not output, the sequence ends
                return self.end("error", flush=True)
        self.sampler.output_ids.append(token)
        self.logprobs.append(logprob)
        piece = Piece(
            "",
            [token],
            [logprob],
            [top] if top is not None else [],
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            accepted_prediction_tokens=self.prediction_tokens[0],
            rejected_prediction_tokens=self.prediction_tokens[1],
        )
        if ends:
            piece.text, self.finish_reason = self.stream.flush(), "stop"
        else:
            piece.text, stopped = self.stream.push(token)
            if stopped:
                self.finish_reason = "stop"
            elif self.constraint is not None and self.constraint.complete:
                piece.text += self.stream.flush()
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.budget:
                piece.text += self.stream.flush()  # a stop string may still complete in the tail
                self.finish_reason = "stop" if self.stream.stopped else "length"
        piece.finish_reason = self.finish_reason
        return piece

    def end(self, reason: str, *, flush: bool = False) -> Piece:
        """End the sequence from outside (cancelled, timed out, failed): the last, token-less
        piece; with `flush`, it releases the text held back so far."""
        text = self.stream.flush() if flush and not self.finished else ""
        self.finish_reason = reason
        return Piece(
            text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            accepted_prediction_tokens=self.prediction_tokens[0],
            rejected_prediction_tokens=self.prediction_tokens[1],
        )

    def fork(self) -> SequenceDecoder:
        """An independent copy (beam search extends one hypothesis several ways)."""
        twin = object.__new__(SequenceDecoder)
        twin.params, twin.eot, twin.budget, twin.finish_reason = (
            self.params,
            self.eot,
            self.budget,
            self.finish_reason,
        )
        twin.vocab_size = self.vocab_size
        twin.prediction_ids, twin.prediction_tokens = self.prediction_ids, list(self.prediction_tokens)
        twin.sampler = RowState(
            self.params, self.sampler.prompt_ids, self.sampler.generator, list(self.sampler.output_ids)
        )
        twin.logprobs = list(self.logprobs)
        twin.stream = self.stream.fork()
        twin.constraint = self.constraint.fork() if self.constraint is not None else None
        twin.sampler.bad_words_ids = self.sampler.bad_words_ids
        return twin

    def completion(self) -> Piece:
        """Everything this sequence has shown so far, as one piece (a finished one's whole text)."""
        return Piece(
            self.stream.text,
            list(self.output_ids),
            list(self.logprobs),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            accepted_prediction_tokens=self.prediction_tokens[0],
            rejected_prediction_tokens=self.prediction_tokens[1],
        )


def bad_words_ids(tokenizer: Tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each bad word's tokens, as it would appear alone and after a space (vLLM's rule)."""
    out = []
    for w in words:
        for variant in (w, " " + w):
            ids = tokenizer.encode(variant)
            if ids and ids not in out:
                out.append(ids)
    return out


def constrain(logits: Tensor, decoders: Sequence[SequenceDecoder]) -> Tensor:
    """The logits to sample from: the constrained rows' disallowed tokens at -inf (a copy when
    any row has a constraint; `logits` itself otherwise)."""
    rows = [j for j, d in enumerate(decoders) if d.constraint is not None]
    if not rows:
        return logits
    bias = mask_bias([decoders[j].constraint for j in rows], logits.shape[-1])
    bias = bias.to(device=logits.device, dtype=logits.dtype)
    if len(rows) == len(decoders):
        return logits + bias
    out = logits.clone()
    return out.index_add_(0, torch.tensor(rows, device=logits.device), bias)


def decode_tokens(logits: Tensor, decoders: Sequence[SequenceDecoder]) -> list[Piece]:
    """Choose the next token of each sequence from its row of `logits` (B, V) and accept it:
    one piece per sequence. The chosen token's log-probability (and the top alternatives when a
    sequence asks) come from the model's unprocessed distribution, as OpenAI reports them, over
    the tokenizer's ids only (`in_vocabulary`): before penalties, filters and constraints."""
    logits = in_vocabulary(logits, min(d.vocab_size for d in decoders))
    tokens = sample(constrain(logits, decoders), [d.sampler for d in decoders], decoders[0].eot)
    top_n = max(d.params.logprobs for d in decoders)
    chosen, top_v, top_i = token_logprobs(logits, tokens, top_n)
    toks, lps = tokens.tolist(), chosen.tolist()
    if top_n:
        top_v, top_i = top_v.tolist(), top_i.tolist()
    pieces = []
    for j, d in enumerate(decoders):
        k = d.params.logprobs
        top = dict(zip(top_i[j][:k], top_v[j][:k])) if k else None
        pieces.append(d.accept(toks[j], lps[j], top))
    return pieces
