"""Text generation for both model kinds: a batch of prompts decoded together with a KV cache.

`generate` is the friendly entry point; `generate_batch` yields per-row events and is what
streaming is built on. (The server runs its own continuous-batching loop over the same parts:
`model.start`/`model.step`, `sampling.sample` and `streaming.TextStream`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from .sampling import RowState, SamplingParams, sample, token_logprobs
from .streaming import TextStream
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class Event:
    """Something new about one row: a piece of text, and its finish reason on the last event."""
    row: int
    text: str
    token_ids: list[int] = field(default_factory=list)  # tokens consumed by this event
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" or "length" on the row's last event


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprob: float = 0.0  # sum of the chosen tokens' log-probabilities
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)


def is_seq2seq(model) -> bool:
    return model.config.arch == "seq2seq"


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
    return ids


def context_budget(model, prompt_len: int, max_new_tokens: int) -> int:
    """How many new tokens fit: a GPT's prompt and output share block_size; an encoder-decoder's
    output has block_size to itself (less the start token)."""
    block = model.config.block_size
    if is_seq2seq(model):
        if prompt_len > block:
            raise ValueError(f"the source has {prompt_len} tokens; the model takes at most {block}")
        return min(max_new_tokens, block - 1)
    if prompt_len >= block:
        raise ValueError(f"the prompt has {prompt_len} tokens; the model's context is {block}, "
                         f"which leaves no room for new tokens")
    return min(max_new_tokens, block - prompt_len)


@torch.inference_mode()
def generate_batch(model, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                   params: Sequence[SamplingParams]) -> Iterator[Event]:
    """Decode every prompt (token ids) together in one batch; yield Events as text becomes safe
    to show. Each row stops at end-of-text, a stop string, or its token budget."""
    B = len(prompts)
    if B == 0:
        return
    for p in params:
        p.validate(model.config.vocab_size)
    budgets = [context_budget(model, len(ids), p.max_new_tokens) for ids, p in zip(prompts, params)]
    eot = tokenizer.eot_token
    rows = [RowState.new(p, ids) for ids, p in zip(prompts, params)]
    streams = [TextStream(tokenizer, p.stop) for p in params]
    if is_seq2seq(model):
        cache = model.new_cache(B, max_len=max(budgets) + 1, src_len=max(map(len, prompts)))
        logits = model.start(prompts, cache, bos_token_id=eot)
    else:
        cache = model.new_cache(B, max_len=max(len(ids) + n for ids, n in zip(prompts, budgets)))
        logits = model.start(prompts, cache)

    active = list(range(B))
    while active:
        states = [rows[i] for i in active]
        tokens = sample(logits, states)
        chosen_lp, top_v, top_i = token_logprobs(logits, tokens, max(r.params.logprobs for r in states))
        still = []
        for j, i in enumerate(active):
            tok = int(tokens[j])
            r = rows[i]
            r.output_ids.append(tok)
            ev = Event(row=i, text="", token_ids=[tok])
            ev.logprobs.append(float(chosen_lp[j]))
            if r.params.logprobs:
                n = r.params.logprobs
                ev.top_logprobs.append({int(t): float(v) for t, v in zip(top_i[j, :n], top_v[j, :n])})
            if tok == eot and not r.params.ignore_eos:
                ev.text, ev.finish_reason = streams[i].flush(), "stop"
            else:
                ev.text, stopped = streams[i].push(tok)
                if stopped:
                    ev.finish_reason = "stop"
                elif len(r.output_ids) >= budgets[i]:
                    ev.text += streams[i].flush()
                    ev.finish_reason = "stop" if streams[i].stopped else "length"
            yield ev
            if ev.finish_reason is None:
                still.append(j)
        if not still:
            return
        keep = torch.tensor(still, device=tokens.device)
        active = [active[j] for j in still]
        # finished rows drop out of the batch: only the live ones run through the model
        logits = model.step(tokens[keep][:, None], cache, rows=torch.tensor(active))


def complete(model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
             params: Union[SamplingParams, Sequence[SamplingParams]]) -> list[Completion]:
    """Generate for several prompts at once (greedy, sampled or beam search) and collect results."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    plist = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(ids):
        raise ValueError(f"got {len(ids)} prompts but {len(plist)} sampling params")
    out: list[Optional[Completion]] = [None] * len(ids)
    plain = [i for i, p in enumerate(plist) if p.num_beams == 1]
    if plain:
        parts = {i: Completion("", [], "length", len(ids[i])) for i in plain}
        for ev in generate_batch(model, tokenizer, [ids[i] for i in plain], [plist[i] for i in plain]):
            c = parts[plain[ev.row]]
            c.text += ev.text
            c.token_ids += ev.token_ids
            c.logprobs += ev.logprobs
            c.top_logprobs += ev.top_logprobs
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
        for i, c in parts.items():
            c.logprob = float(sum(c.logprobs))
            out[i] = c
    for i, p in enumerate(plist):
        if p.num_beams > 1:
            from .beam import beam_search
            out[i] = beam_search(model, tokenizer, ids[i], p)[0]
    return out  # type: ignore[return-value]


def generate(model, tokenizer: Tokenizer, prompt: Union[Prompt, Sequence[str]], *, stream: bool = False,
             **sampling) -> Union[str, list[str], Iterator[str]]:
    """Generate text.

    prompt: a string (or a list of token ids); for an encoder-decoder, the source text. A list of
    strings is decoded together as one batch and gives a list of strings.
    stream: return an iterator of text pieces instead (a single prompt only; beam search yields
    its best sequence as one piece).
    sampling: any SamplingParams field: max_new_tokens=64, temperature=1.0 (0 = greedy), top_k,
    top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed,
    stop (a string or list), ignore_eos, num_beams, length_penalty.
    """
    params = SamplingParams(**sampling)
    many = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], str)
    if stream:
        if many:
            raise ValueError("stream=True takes a single prompt")
        return _stream(model, tokenizer, prompt, params)
    if many:
        return [c.text for c in complete(model, tokenizer, prompt, params)]
    return complete(model, tokenizer, [prompt], params)[0].text


def _stream(model, tokenizer: Tokenizer, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
    ids = encode_prompt(tokenizer, prompt)  # errors surface at the call, not at first next()
    params.validate(model.config.vocab_size)
    context_budget(model, len(ids), params.max_new_tokens)
    if params.num_beams > 1:
        from .beam import beam_search
        best = beam_search(model, tokenizer, ids, params)[0]
        return iter([best.text])
    return (ev.text for ev in generate_batch(model, tokenizer, [ids], [params]) if ev.text)
