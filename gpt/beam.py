"""Beam search for both model kinds: the beams are rows of one KV cache, reordered every step
to follow their parents. Each hypothesis is a `SequenceDecoder`, so a beam ends at end-of-text,
a stop string or its budget by exactly the rules sampling uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoding import Piece, SequenceDecoder
from .limits import ContextLimits
from .sampling import SamplingParams, apply_penalties
from .tokenizer import Tokenizer


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


@torch.inference_mode()
def beam_search(model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> list[Piece]:
    """The `num_beams` best continuations of one prompt, best first (by length-penalised score).

    A hypothesis ends at end-of-text (unless ignore_eos), when a stop string completes, or at
    max_new_tokens (shrunk to what fits in the context). Search stops once no running beam can
    beat the finished ones (transformers' default, early_stopping=False). Penalties and logit
    bias apply; temperature and the sampling filters do not (beam search is deterministic). Each
    token's logprob is from the penalised distribution the beams are scored by.
    """
    prompt_ids, budget = ContextLimits.of(model, tokenizer).check(prompt_ids, params, clamp=True)
    K = params.num_beams
    if model.config.is_seq2seq:
        cache = model.new_cache(K, max_len=budget + 1, src_len=len(prompt_ids))
    else:
        cache = model.new_cache(K, max_len=len(prompt_ids) + budget)
    logits = model.start([prompt_ids], cache, rows=slice(0, 1))
    cache.reorder(torch.zeros(K, dtype=torch.long))  # every beam starts from the one prefill
    logits = logits.expand(K, -1)

    first = SequenceDecoder(tokenizer, prompt_ids, params, budget)
    beams = [first] + [first.fork() for _ in range(K - 1)]
    scores = torch.full((K,), float("-inf"), device=logits.device)
    scores[0] = 0.0  # the beams are identical at first: expand only one
    finished: list[tuple[float, Piece]] = []  # (score, completion), best first

    def finish(d: SequenceDecoder, logprob: float) -> None:
        finished.append((_score(logprob, len(d.output_ids), params.length_penalty), d.completion()))
        finished.sort(key=lambda h: h[0], reverse=True)
        del finished[K:]

    while True:
        logits = logits[:, :first.vocab_size].float().clone()  # never an id the tokenizer lacks
        for b, d in enumerate(beams):
            apply_penalties(logits[b], d.sampler, d.eot)
        logp = F.log_softmax(logits, dim=-1)
        cand = (scores[:, None] + logp).view(-1)
        top_scores, top_idx = cand.topk(2 * K)
        V = logits.shape[-1]
        parents, running, new_scores = [], [], []
        for s, flat in zip(top_scores.tolist(), top_idx.tolist()):
            if s == float("-inf"):
                break
            parent, tok = divmod(flat, V)
            d = beams[parent].fork()
            d.accept(tok, float(logp[parent, tok]))
            if d.finished:
                finish(d, s)
            else:
                parents.append(parent)
                running.append(d)
                new_scores.append(s)
            if len(running) == K:
                break
        if not running:
            break
        best_running = _score(new_scores[0], len(running[0].output_ids), params.length_penalty)
        if len(finished) == K and finished[-1][0] >= best_running:
            break
        n = len(running)
        cache.reorder(torch.tensor(parents), torch.arange(n))
        beams = running + [running[0].fork() for _ in range(K - n)]
        scores = torch.tensor(new_scores + [float("-inf")] * (K - n), device=logits.device)
        tokens = torch.tensor([d.last_token for d in running], device=logits.device)[:, None]
        logits = model.step(tokens, cache, rows=slice(0, n))
        if n < K:
            logits = torch.cat([logits, logits.new_full((K - n, V), 0.0)])

    return [c for _, c in finished]
