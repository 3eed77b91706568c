"""From request fields to what the engine takes: prompt token ids, the new-token budget and one
`SamplingParams` per choice.

The context's rules (empty prompts, token ids outside the vocabulary, what fits, the operator's
max_prompt_tokens) belong to the engine's `gpt.ContextLimits`; this module asks it, naming the
request's fields, and turns its `gpt.RequestError`s into 400s. With a seed, choice i samples with
seed + i, so a request's choices differ yet reproduce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple

from gpt import RequestError, SamplingParams

from .chat_template import ChatTemplate
from .errors import from_request_error, invalid
from .protocol import SamplingFields

SEED_SPAN = 2**64  # torch.Generator.manual_seed takes [-2**63, 2**64)


def check_fanout(engine, prompts: int, n: int) -> None:
    """Refuse, before any tokenizing, a request with more generations (prompts x n) than the
    engine's queue holds: it could never be admitted whole."""
    if prompts * n > engine.max_queue:
        what = (
            f"{prompts} prompts x n {n} = {prompts * n} generations" if prompts > 1 else f"n {n} generations"
        )
        raise invalid(
            f"the request asks for {what}, but the server queues at most {engine.max_queue}",
            "n",
            code="invalid_combination",
        )


async def prompt_ids_off_loop(engine, prompts: list, param: str) -> list[list[int]]:
    """prompt_ids of several prompts, tokenized on a worker thread: a large body must not hold
    the event loop (and every other stream) while it is encoded."""
    return await asyncio.to_thread(lambda: [prompt_ids(engine, p, param) for p in prompts])


def prompt_ids(engine, prompt: str | list[int], param: str) -> list[int]:
    """A prompt (text, or token ids) as token ids the model can take; a 400 naming `param` if not."""
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    try:
        return engine.limits.check_prompt(ids, param=param)
    except RequestError as e:
        raise from_request_error(e) from None


def render_messages(template: ChatTemplate, messages) -> str:
    """A chat's messages as one prompt, through the chat template; a 400 naming a role it lacks."""
    try:
        return template.render([(m.role, m.text) for m in messages])
    except ValueError as e:
        bad = next((i for i, m in enumerate(messages) if m.role not in template.roles), None)
        raise invalid(str(e), None if bad is None else f"messages.{bad}.role") from None


def budget(engine, prompt_len: int, wanted: int | None, default: int) -> int:
    """New tokens to generate after a checked prompt: `wanted` (the request's max_tokens) if it
    fits, else a 400 naming both numbers; with no max_tokens, `default` shrunk to the room left."""
    try:
        return engine.limits.budget(prompt_len, wanted, default=default, param="max_tokens")
    except RequestError as e:
        raise from_request_error(e) from None


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i's seed: seed + i, wrapped into what torch.Generator.manual_seed accepts."""
    if seed is None:
        return None
    seed += choice
    return seed - SEED_SPAN if seed >= SEED_SPAN else seed


def sampling_params(
    req: SamplingFields,
    vocab_size: int,
    max_tokens: int,
    choice: int,
    *,
    extra_stop: Sequence[str] = (),
    logprobs: int = 0,
) -> SamplingParams:
    """The SamplingParams of one choice of a request; token ids checked against `vocab_size`.
    max_tokens 0 (an echo that generates nothing) is checked like the others, and the engine is
    told not to generate (`Engine.submit(generate=False)`), since SamplingParams wants >= 1."""
    bias = req.logit_bias or {}
    bad = next((t for t in bias if t >= vocab_size), None)
    if bad is not None:
        raise invalid(f"logit_bias: token id {bad} is out of range [0, {vocab_size})", "logit_bias")
    if req.min_tokens > max_tokens:
        raise invalid(
            f"min_tokens is {req.min_tokens}, more than the {max_tokens} new tokens this request may "
            f"generate",
            "min_tokens",
            code="invalid_combination",
        )
    bad = next((i for i, t in enumerate(req.stop_token_ids or ()) if t >= vocab_size), None)
    if bad is not None:
        raise invalid(
            f"stop_token_ids: token id {req.stop_token_ids[bad]} is out of range [0, {vocab_size})",
            f"stop_token_ids.{bad}",
        )
    if req.top_k > vocab_size:
        raise invalid(f"top_k is {req.top_k}, more than the vocabulary ({vocab_size})", "top_k")
    try:
        return SamplingParams(
            max_new_tokens=max(max_tokens, 1),
            temperature=req.temperature,
            top_k=max(req.top_k, 0),
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=bias or None,
            seed=choice_seed(req.seed, choice),
            stop=list(dict.fromkeys([*(req.stop or ()), *extra_stop])),
            stop_token_ids=req.stop_token_ids or (),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            num_beams=req.num_beams,
            length_penalty=req.length_penalty,
        )
    except ValueError as e:
        raise invalid(str(e)) from None


class Job(NamedTuple):
    """What the engine is asked for: `n` choices of one prompt. A sampled job has n = 1 (one per
    choice, each with its own seed); a beam search (params.num_beams > 1) is one job whose n best
    beams are the choices."""

    ids: list[int]
    params: SamplingParams
    n: int = 1


def choices(
    engine,
    req: SamplingFields,
    ids: list[int],
    max_tokens: int,
    *,
    extra_stop: Sequence[str] = (),
    logprobs: int = 0,
) -> list[Job]:
    """The engine jobs for one prompt's `n` choices: one per choice, or one beam search for all."""
    vocab = engine.limits.vocab_size
    if req.num_beams > 1:
        return [Job(ids, sampling_params(req, vocab, max_tokens, 0, extra_stop=extra_stop), req.n)]
    return [
        Job(ids, sampling_params(req, vocab, max_tokens, i, extra_stop=extra_stop, logprobs=logprobs))
        for i in range(req.n)
    ]
