"""Beam search for both model kinds: the beams are rows of one KV cache, reordered every step
to follow their parents. Each hypothesis is a `SequenceDecoder`, so a beam ends at end-of-text,
a stop string or its budget by exactly the rules sampling uses.

`BeamSearch` advances one step per call, so a server can interleave a search with its other
requests; `beam_search` runs one to the end."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoding import Piece, SequenceDecoder
from .limits import ContextLimits
from .sampling import SamplingParams, apply_penalties
from .tokenizer import Tokenizer


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


class BeamSearch:
    """The search state of one prompt: `num_beams` running hypotheses in a KV cache of their
    own, and the best finished ones.

        search = BeamSearch(model, tokenizer, prompt_ids, params)   # reads the prompt
        while not search.done:
            search.step()                                           # one token for every beam
        best = search.results()

    budget: new tokens at most (default: params.max_new_tokens shrunk to what fits the context;
    a caller that has checked the limits itself, like a server, passes its own)."""

    @torch.inference_mode()
    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        budget: int | None = None,
    ):
        if budget is None:
            prompt_ids, budget = ContextLimits.of(model, tokenizer).check(prompt_ids, params, clamp=True)
        self.model, self.params, self.K = model, params, params.num_beams
        K = self.K
        if model.config.is_seq2seq:
            self.cache = model.new_cache(K, max_len=budget + 1, src_len=len(prompt_ids))
        else:
            self.cache = model.new_cache(K, max_len=len(prompt_ids) + budget)
        logits = model.start([prompt_ids], self.cache, rows=slice(0, 1))
        self.cache.reorder(torch.zeros(K, dtype=torch.long))  # every beam starts from the one prefill
        self.logits = logits.expand(K, -1)
        first = SequenceDecoder(tokenizer, prompt_ids, params, budget)
        self.beams = [first] + [first.fork() for _ in range(K - 1)]
        self.scores = torch.full((K,), float("-inf"), device=logits.device)
        self.scores[0] = 0.0  # the beams are identical at first: expand only one
        self.finished: list[tuple[float, Piece]] = []  # (score, completion), best first
        self.running_scores: list[float] = []  # of the running beams, after the first step
        self.done = False

    def _finish(self, d: SequenceDecoder, logprob: float) -> None:
        self.finished.append((_score(logprob, len(d.output_ids), self.params.length_penalty), d.completion()))
        self.finished.sort(key=lambda h: h[0], reverse=True)
        del self.finished[self.K :]

    @torch.inference_mode()
    def step(self) -> None:
        """Extend every running beam by one token, keep the best `num_beams`, and set `done`
        once no running beam can beat the finished ones (transformers' early_stopping=False)."""
        if self.done:
            return
        K, lp = self.K, self.params.length_penalty
        first = self.beams[0]
        logits = self.logits[:, : first.vocab_size].float().clone()  # never an id the tokenizer lacks
        for b, d in enumerate(self.beams):
            apply_penalties(logits[b], d.sampler, d.eot)
        logp = F.log_softmax(logits, dim=-1)
        cand = (self.scores[:, None] + logp).view(-1)
        top_scores, top_idx = cand.topk(2 * K)
        V = logits.shape[-1]
        parents, running, new_scores = [], [], []
        for s, flat in zip(top_scores.tolist(), top_idx.tolist()):
            if s == float("-inf"):
                break
            parent, tok = divmod(flat, V)
            d = self.beams[parent].fork()
            d.accept(tok, float(logp[parent, tok]))
            if d.finished:
                self._finish(d, s)
            else:
                parents.append(parent)
                running.append(d)
                new_scores.append(s)
            if len(running) == K:
                break
        if not running:
            self.done, self.beams = True, []
            return
        best_running = _score(new_scores[0], len(running[0].output_ids), lp)
        if len(self.finished) == K and self.finished[-1][0] >= best_running:
            self.done, self.beams = True, []
            return
        n = len(running)
        self.cache.reorder(torch.tensor(parents), torch.arange(n))
        self.beams = running + [running[0].fork() for _ in range(K - n)]
        self.scores = torch.tensor(new_scores + [float("-inf")] * (K - n), device=logits.device)
        self.running_scores = new_scores
        tokens = torch.tensor([d.last_token for d in running], device=logits.device)[:, None]
        logits = self.model.step(tokens, self.cache, rows=slice(0, n))
        if n < K:
            logits = torch.cat([logits, logits.new_full((K - n, V), 0.0)])
        self.logits = logits

    def results(self, reason: str | None = None) -> list[Piece]:
        """The best hypotheses, best first (by length-penalised score). Once `done`, the
        finished ones; before that (a search cut short), the finished and running ones ranked
        together, the running ones ending with `reason` (e.g. "timeout")."""
        if self.done or reason is None:
            return [c for _, c in self.finished]
        lp = self.params.length_penalty
        ranked = list(self.finished)
        seen = set()
        for s, d in zip(self.running_scores, self.beams):
            if tuple(d.output_ids) in seen:
                continue
            seen.add(tuple(d.output_ids))
            piece = d.completion()
            piece.finish_reason = reason
            ranked.append((_score(s, len(d.output_ids), lp), piece))
        ranked.sort(key=lambda h: h[0], reverse=True)
        return [c for _, c in ranked[: self.K]]

    def close(self) -> None:
        """Free the KV cache now rather than when the search is collected."""
        self.cache = self.logits = None
        self.done, self.beams = True, []


def beam_search(model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> list[Piece]:
    """The `num_beams` best continuations of one prompt, best first (by length-penalised score).

    A hypothesis ends at end-of-text (unless ignore_eos), when a stop string completes, or at
    max_new_tokens (shrunk to what fits in the context). Search stops once no running beam can
    beat the finished ones (transformers' default, early_stopping=False). Penalties and logit
    bias apply; temperature and the sampling filters do not (beam search is deterministic). Each
    token's logprob is from the penalised distribution the beams are scored by.
    """
    search = BeamSearch(model, tokenizer, prompt_ids, params)
    while not search.done:
        search.step()
    return search.results()
