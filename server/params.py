"""From request fields to what the engine takes: prompt token ids, the new-token budget and one
`SamplingParams` per choice.

The context's rules (empty prompts, token ids outside the vocabulary, what fits, the operator's
max_prompt_tokens) belong to the engine's `gpt.ContextLimits`, the sampling rules (ranges, token
ids within the vocabulary, logprobs) to `gpt.SamplingParams.validate`; this module asks them,
naming the request's fields, and turns their `gpt.RequestError`s into 400s. With a seed, choice i samples with
seed + i, so a request's choices differ yet reproduce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from gpt import Constraint, ContextLimits, RequestError, SamplingParams

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


# Text up to this many characters is tokenized on the event loop, in well under a millisecond;
# handing it to a worker thread and back costs about as much as that again. Token ids are only
# checked, never tokenized: they do not count.
INLINE_TEXT = 4096


def _small(texts) -> bool:
    return sum(len(t) for t in texts if isinstance(t, str)) <= INLINE_TEXT


async def prompt_ids_off_loop(engine, prompts: list, param: str) -> list[list[int]]:
    """prompt_ids of several prompts, tokenized on a worker thread unless they are small: a
    large body must not hold the event loop (and every other stream) while it is encoded."""
    if _small(prompts):
        return [prompt_ids(engine, p, param) for p in prompts]
    return await asyncio.to_thread(lambda: [prompt_ids(engine, p, param) for p in prompts])


def prompt_ids(engine, prompt: str | list[int], param: str) -> list[int]:
    """A prompt (text, or token ids) as token ids the model can take; a 400 naming `param` if not."""
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    try:
        return engine.limits.check_prompt(ids, param=param)
    except RequestError as e:
        raise from_request_error(e) from None


async def prediction_ids(engine, prediction) -> list[int] | None:
    """A request's `prediction` as token ids (tokenized off the event loop), or None for none;
    a 400 if it is longer than the model's context: no output could repeat all of it."""
    if prediction is None or not prediction.text:
        return None
    text = prediction.text
    ids = (
        engine.tokenizer.encode(text)
        if _small([text])
        else await asyncio.to_thread(engine.tokenizer.encode, text)
    )
    limit = engine.limits.max_len
    if len(ids) > limit:
        raise invalid(
            f"the prediction has {len(ids)} tokens, more than the model's context of {limit}",
            "prediction",
            code="context_length_exceeded",
        )
    return ids


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
    limits: ContextLimits,
    max_tokens: int,
    choice: int,
    *,
    extra_stop: Sequence[str] = (),
    logprobs: int = 0,
    prompt_logprobs: int | None = None,
    names: Mapping[str, str] = {},
    constraint: Constraint | None = None,
    prediction: list[int] | None = None,
) -> SamplingParams:
    """The SamplingParams of one choice of a request, checked against the model (`limits`) by
    the library (`gpt.SamplingParams.validate`: ranges, token ids within the vocabulary, prompt
    logprobs on a model that predicts its prompt). Its errors are 400s naming the request's
    fields: `names` maps the library's field names to this endpoint's."""
    if req.min_tokens > max_tokens:
        raise invalid(
            f"min_tokens is {req.min_tokens}, more than the {max_tokens} new tokens this request may "
            f"generate",
            "min_tokens",
            code="invalid_combination",
        )
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=max(req.top_k, 0),
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias or None,
            seed=choice_seed(req.seed, choice),
            stop=[*(req.stop or ()), *extra_stop],
            stop_token_ids=req.stop_token_ids or (),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            num_beams=req.num_beams,
            length_penalty=req.length_penalty,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words or (),
            prediction=prediction,
        )
        limits.check_params(params)
    except RequestError as e:
        raise from_request_error(e, {**LIBRARY_NAMES, **names}) from None
    return params


# the library's names of SamplingParams fields that both endpoints call otherwise
LIBRARY_NAMES = {"max_new_tokens": "max_tokens"}


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
    prompt_logprobs: int | None = None,
    names: Mapping[str, str] = {},
    constraint: Constraint | None = None,
    prediction: list[int] | None = None,
) -> list[Job]:
    """The engine jobs for one prompt's `n` choices: one per choice, or one beam search for all.
    The choices share the request's `constraint` (each sequence keeps its own state in it)."""
    options = dict(
        extra_stop=extra_stop,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        names=names,
        constraint=constraint,
        prediction=prediction,
    )
    if req.num_beams > 1:
        return [Job(ids, sampling_params(req, engine.limits, max_tokens, 0, **options), req.n)]
    return [Job(ids, sampling_params(req, engine.limits, max_tokens, i, **options)) for i in range(req.n)]
