"""Beam search for both model kinds: the beams are rows of one KV cache, reordered every step
to follow their parents."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .generate import Completion, context_budget, is_seq2seq
from .sampling import RowState, SamplingParams, apply_penalties
from .tokenizer import Tokenizer


@dataclass
class _Hypothesis:
    token_ids: list[int]
    logprob: float
    finish_reason: str
    score: float  # logprob / length ** length_penalty


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


def _stop_at(text: str, stops) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def beam_search(model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> list[Completion]:
    """The `num_beams` best continuations of one prompt, best first (by length-penalised score).

    A hypothesis ends at end-of-text (unless ignore_eos), when its text contains a stop string,
    or at max_new_tokens. Search stops once no running beam can beat the finished ones
    (transformers' default, early_stopping=False). Penalties and logit bias apply; temperature
    and the sampling filters do not (beam search is deterministic).
    """
    params.validate(model.config.vocab_size)
    K, eot = params.num_beams, tokenizer.eot_token
    budget = context_budget(model, len(prompt_ids), params.max_new_tokens)
    if is_seq2seq(model):
        cache = model.new_cache(K, max_len=budget + 1, src_len=len(prompt_ids))
        logits = model.start([prompt_ids], cache, rows=slice(0, 1), bos_token_id=eot)
    else:
        cache = model.new_cache(K, max_len=len(prompt_ids) + budget)
        logits = model.start([prompt_ids], cache, rows=slice(0, 1))
    cache.reorder(torch.zeros(K, dtype=torch.long))  # every beam starts from the one prefill
    logits = logits.expand(K, -1)

    beams: list[list[int]] = [[] for _ in range(K)]
    scores = torch.full((K,), float("-inf"), device=logits.device)
    scores[0] = 0.0  # the beams are identical at first: expand only one
    finished: list[_Hypothesis] = []

    def finish(ids: list[int], logprob: float, reason: str) -> None:
        finished.append(_Hypothesis(ids, logprob, reason, _score(logprob, len(ids), params.length_penalty)))
        finished.sort(key=lambda h: h.score, reverse=True)
        del finished[K:]

    for step in range(budget):
        logits = logits.float().clone()
        for b in range(K):
            apply_penalties(logits[b], RowState(params, prompt_ids, output_ids=beams[b]))
        cand = (scores[:, None] + F.log_softmax(logits, dim=-1)).view(-1)
        top_scores, top_idx = cand.topk(2 * K)
        V = logits.shape[-1]
        parents, new_beams, new_scores = [], [], []
        for s, flat in zip(top_scores.tolist(), top_idx.tolist()):
            if s == float("-inf"):
                break
            parent, tok = divmod(flat, V)
            ids = beams[parent] + [tok]
            if tok == eot and not params.ignore_eos:
                finish(ids, s, "stop")
            elif params.stop and _stop_at(tokenizer.decode(ids), params.stop)[1]:
                finish(ids, s, "stop")
            elif step == budget - 1:
                finish(ids, s, "length")
            else:
                parents.append(parent)
                new_beams.append(ids)
                new_scores.append(s)
            if len(new_beams) == K:
                break
        if not new_beams:
            break
        best_running = _score(new_scores[0], step + 1, params.length_penalty)
        if len(finished) == K and finished[-1].score >= best_running:
            break
        n = len(new_beams)
        cache.reorder(torch.tensor(parents), torch.arange(n))
        beams = new_beams + [[] for _ in range(K - n)]
        scores = torch.tensor(new_scores + [float("-inf")] * (K - n), device=logits.device)
        tokens = torch.tensor([ids[-1] for ids in new_beams], device=logits.device)[:, None]
        logits = model.step(tokens, cache, rows=slice(0, n))
        if n < K:
            logits = torch.cat([logits, logits.new_full((K - n, V), 0.0)])

    out = []
    for h in finished:
        body = h.token_ids[:-1] if h.token_ids and h.token_ids[-1] == eot and not params.ignore_eos else h.token_ids
        text, _ = _stop_at(tokenizer.decode(body), params.stop)
        out.append(Completion(text=text, token_ids=h.token_ids, finish_reason=h.finish_reason,
                              prompt_tokens=len(prompt_ids), logprob=h.logprob))
    return out
