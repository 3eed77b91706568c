"""What the completion and chat routers share: turning a request into engine submissions
(one per choice), merging the choices' outputs, logprob formatting and server-sent events.

A request with P prompts and `n` choices becomes P * n engine requests; choice index
`prompt_index * n + i` (OpenAI's order), and with a seed, choice i samples with seed + i so the
choices differ yet reproduce.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

from fastapi import Request
from starlette.responses import StreamingResponse

from gpt import IncrementalDetokenizer, SamplingParams

from .engine import EngineClosed, QueueFull
from .errors import APIError, invalid
from .protocol import SamplingFields

log = logging.getLogger("server")

# OpenAI knows "stop" and "length". A request cut short by --timeout or by shutdown did not
# reach a stop either, so it reports "length": the output ended at a limit, not naturally.
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}


def get_engine(request: Request):
    """The running engine, or a 503 while the model loads or the server drains."""
    state = request.app.state
    if state.draining:
        raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")
    engine = state.engine
    if engine is None:
        reason = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise APIError(503, reason, code="model_not_ready")
    return engine


def check_model(request: Request, name: Optional[str]) -> str:
    served = request.app.state.settings.model_name
    if name is not None and name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    return served


def context_limits(engine) -> tuple[bool, int, int]:
    """(is seq2seq, tokens per cache row, longest source): a GPT's prompt and output share the row;
    an encoder-decoder's source has its own block and its output, start token included, the row."""
    config = engine.model.config
    max_len = getattr(engine, "max_len", config.block_size)
    seq2seq = config.arch == "seq2seq"
    return seq2seq, max_len, (getattr(engine, "max_source_len", config.block_size) if seq2seq else max_len)


def encode_prompt(tokenizer, prompt: Union[str, list[int]], param: str) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise invalid("the prompt is empty", param)
        return ids
    bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is out of range [0, {tokenizer.vocab_size})", param)
    return list(prompt)


def max_new_tokens(request: Request, engine, prompt_len: int, wanted: Optional[int], param: str) -> int:
    """The request's token budget, checked against the context: too much is a 400 naming both
    numbers; when the client gave no max_tokens, the default shrinks to the room left."""
    settings = request.app.state.settings
    seq2seq, max_len, max_source = context_limits(engine)
    limit = settings.max_prompt_tokens
    if limit is not None and prompt_len > limit:
        raise invalid(f"the prompt has {prompt_len} tokens; this server accepts at most {limit}", param,
                      code="context_length_exceeded")
    room = max_len - 1 if seq2seq else max_len - prompt_len
    if prompt_len > max_source or room < 1:
        raise invalid(f"the prompt has {prompt_len} tokens; the model's context is {max_source} tokens, "
                      f"which leaves no room for new ones", param, code="context_length_exceeded")
    if wanted is None:
        return min(settings.default_max_tokens, room)
    if wanted > room:
        if seq2seq:
            msg = f"max_tokens is {wanted}, but the model generates at most {room} tokens"
        else:
            msg = (f"the prompt has {prompt_len} tokens and max_tokens is {wanted}: {prompt_len + wanted} "
                   f"tokens, more than the model's context of {max_len}")
        raise invalid(msg, "max_tokens", code="context_length_exceeded")
    return wanted


def sampling_params(req: SamplingFields, engine, max_tokens: int, choice: int, *, extra_stop: Sequence[str] = (),
                    logprobs: int = 0) -> SamplingParams:
    vocab = engine.model.config.vocab_size
    bias = req.logit_bias or {}
    bad = next((t for t in bias if t >= vocab), None)
    if bad is not None:
        raise invalid(f"logit_bias: token id {bad} is out of range [0, {vocab})", "logit_bias")
    if req.top_k > vocab:
        raise invalid(f"top_k is {req.top_k}, more than the vocabulary ({vocab})", "top_k")
    seed = None
    if req.seed is not None:
        seed = req.seed + choice
        if seed > 2 ** 64 - 1:  # wrap into what torch.Generator.manual_seed accepts
            seed -= 2 ** 64
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
            min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=bias or None, seed=seed,
            stop=list(dict.fromkeys([*(req.stop or ()), *extra_stop])), ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise invalid(str(e)) from None


def submit_all(request: Request, engine, jobs: Sequence[tuple[list[int], SamplingParams]]) -> list:
    """Submit every choice, or none: on a failure the ones already queued are cancelled."""
    settings = request.app.state.settings
    if len(jobs) > engine.max_queue:
        raise invalid(f"the request needs {len(jobs)} generations (prompts x n), but the server queues at most "
                      f"{engine.max_queue}", "n")
    handles = []
    try:
        for ids, params in jobs:
            handles.append(engine.submit(ids, params, timeout=settings.timeout))
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, QueueFull):
            raise APIError(429, f"the server is busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineClosed):
            raise APIError(503, str(e) or "the server is shutting down", code="shutting_down") from None
        if isinstance(e, ValueError):
            raise invalid(str(e)) from None
        raise
    return handles


def cancel_unfinished(handles) -> None:
    for h in handles:
        if not h.finished:
            h.cancel()


async def merged(handles) -> AsyncIterator[tuple[int, object]]:
    """(choice index, Output) from all handles as they arrive, until every one has finished.
    Closing the iterator early cancels the unfinished requests."""
    if len(handles) == 1:  # the common case: no task per piece to race against other choices
        try:
            async for out in handles[0]:
                yield 0, out
        finally:
            cancel_unfinished(handles)
        return
    pending: dict[asyncio.Future, int] = {}
    try:
        for i, h in enumerate(handles):
            pending[asyncio.ensure_future(h.__anext__())] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.get):
                i = pending.pop(fut)
                out = fut.result()
                if out.finish_reason is None:
                    pending[asyncio.ensure_future(handles[i].__anext__())] = i
                yield i, out
    finally:
        for fut in pending:
            fut.cancel()
        cancel_unfinished(handles)


@dataclass
class Choice:
    """One choice's output gathered from its pieces (for non-streamed responses)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    completion_tokens: int = 0

    def add(self, out) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason


def finish_reason(reason: Optional[str]) -> Optional[str]:
    if reason == "error":
        raise APIError(500, "generation failed inside the engine (see the server log)")
    return None if reason is None else FINISH_REASONS.get(reason, reason)


async def collect(request: Request, handles) -> list[Choice]:
    """Run every choice to the end. If the client goes away meanwhile, the requests are
    cancelled (freeing their slots) instead of running on for nobody."""
    choices = [Choice() for _ in handles]

    async def consume():
        async for i, out in merged(handles):
            choices[i].add(out)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                raise APIError(499, "the client disconnected", code="client_closed_request")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        cancel_unfinished(handles)
    for c in choices:
        finish_reason(c.finish_reason)
    return choices


# --- logprobs ------------------------------------------------------------------------------

def token_text(tokenizer, token_id: int) -> str:
    """A token's own text; a token holding part of a UTF-8 character shows U+FFFD (its exact
    bytes are in the chat format's `bytes`)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


class CompletionLogprobBuilder:
    """OpenAI's legacy format, built incrementally so streamed chunks agree with a whole response.
    text_offset is the character offset of each token in the decoded completion."""

    def __init__(self, tokenizer, top_n: int):
        self.tokenizer, self.top_n = tokenizer, top_n
        self.detok = IncrementalDetokenizer(tokenizer)

    def piece(self, out) -> dict:
        tokens, offsets = [], []
        for t in out.token_ids:
            offsets.append(len(self.detok.text))
            self.detok.push(t)
            tokens.append(token_text(self.tokenizer, t))
        top = None
        if self.top_n:
            top = [{token_text(self.tokenizer, t): lp for t, lp in alts.items()} for alts in out.top_logprobs]
        return {"tokens": tokens, "token_logprobs": list(out.logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, out, top_n: int) -> dict:
    def entry(t: int, lp: float) -> dict:
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    content = []
    for k, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        e = entry(t, lp)
        alts = out.top_logprobs[k] if top_n and k < len(out.top_logprobs) else {}
        e["top_logprobs"] = [entry(a, alp) for a, alp in list(alts.items())[:top_n]]
        content.append(e)
    return {"content": content}


# --- server-sent events --------------------------------------------------------------------

def sse(data: Union[dict, str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(exc: APIError) -> str:
    return sse(exc.body())


async def event_stream(handles, *, object_name: str, rid: str, created: int, model_name: str,
                       prompt_tokens: int, include_usage: bool, choice_delta, opening=()):
    """OpenAI's streaming envelope, shared by both endpoints: a chunk per piece of a choice
    (`choice_delta(i, out, finish_reason)` gives the choice dict, or None to skip the piece),
    with `include_usage` a last chunk with `choices: []` and the usage, then `[DONE]`. An
    engine error mid-stream becomes an error event."""
    completion_tokens = [0] * len(handles)
    pieces = merged(handles)

    def chunk(choices: list, usage=None) -> dict:
        d = {"id": rid, "object": object_name, "created": created, "model": model_name, "choices": choices}
        if include_usage:
            d["usage"] = usage  # null on every chunk but the last, as OpenAI does
        return d

    try:
        for choice in opening:
            yield sse(chunk([choice]))
        async for i, out in pieces:
            completion_tokens[i] = out.completion_tokens
            choice = choice_delta(i, out, finish_reason(out.finish_reason))
            if choice is not None:
                yield sse(chunk([choice]))
        if include_usage:
            total = sum(completion_tokens)
            yield sse(chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                 "total_tokens": prompt_tokens + total}))
    except APIError as e:
        yield sse_error(e)
    finally:
        await pieces.aclose()
    yield sse("[DONE]")


class EventStream(StreamingResponse):
    """An SSE response that always closes its generator, so the generator's cleanup (cancelling
    the engine requests) runs the moment the client is gone, not whenever it is garbage-collected."""

    def __init__(self, gen: AsyncIterator[str]):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()
