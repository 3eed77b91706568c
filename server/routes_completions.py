"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not.

With `echo`, each choice's text starts with its prompt, and with `logprobs` its logprobs start
with the prompt's tokens, scored by the engine in the same forward passes that read the prompt
(see server/scheduler.py); `max_tokens: 0` then scores the prompt and generates nothing, which
is what evaluation harnesses ask for (lm-evaluation-harness's `local-completions`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from .api_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from .auth import require_api_key
from .config import Settings
from .deps import check_model, get_engine, get_settings
from .errors import invalid
from .fanout import collect, finish_reason, submit_all
from .logprobs import CompletionLogprobBuilder, EchoedPrompt, join_logprobs
from .params import budget, check_fanout, choices, prediction_ids, prompt_ids_off_loop
from .protocol import (
    CompletionRequest,
)
from .sse import EventStream, event_stream
from .structured import constraint_of, prepare

router = APIRouter(dependencies=[Depends(require_api_key)])

# the library's names of the fields this endpoint calls otherwise (see params.sampling_params):
# the prompt's logprobs are asked for by `echo` (with logprobs, whose range is checked first)
NAMES = {"prompt_logprobs": "echo"}


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    engine=Depends(get_engine),
    settings: Settings = Depends(get_settings),
):
    model_name = check_model(settings, body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of other than n is not supported", "best_of", code="invalid_combination")
    echo = bool(body.echo)
    if body.max_tokens == 0 and not echo:
        raise invalid(
            "max_tokens: 0 (generate nothing) is only allowed with echo: true",
            "max_tokens",
            code="invalid_combination",
        )
    tok = engine.tokenizer
    check_fanout(engine, len(body.prompt), body.n)
    constraint = constraint_of(body)
    await prepare(engine, constraint, settings.constraint_timeout)
    prompts = await prompt_ids_off_loop(engine, body.prompt, "prompt")
    predicted = await prediction_ids(engine, body.prediction)
    echoes = await asyncio.to_thread(lambda: [EchoedPrompt.of(tok, ids) for ids in prompts]) if echo else None
    jobs = []
    prompt_logprobs = body.logprobs if echo else None  # with echo, the prompt's logprobs too
    for ids in prompts:
        max_tokens = budget(engine, len(ids), body.max_tokens, settings.default_max_tokens)
        jobs += choices(
            engine,
            body,
            ids,
            max_tokens,
            logprobs=body.logprobs or 0,
            prompt_logprobs=prompt_logprobs,
            names=NAMES,
            constraint=constraint,
            prediction=predicted,
        )
    handles = submit_all(engine, jobs, settings.timeout)
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid, created = new_id("cmpl"), now()
    # choice i echoes prompt i // n
    echoed = (
        [echoes[i // body.n] for i in range(len(handles))] if echoes is not None else [None] * len(handles)
    )

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            _stream(handles, tok, body, echoed, rid, created, model_name, prompt_tokens, include_usage),
            handles,
        )

    done = await collect(request, handles)
    out = []
    for i, c in enumerate(done):
        e = echoed[i]
        logprobs = None
        if body.logprobs is not None:  # the whole choice as one piece
            logprobs = CompletionLogprobBuilder(tok, body.logprobs, offset=len(e.text) if e else 0).piece(c)
            if e is not None:
                logprobs = join_logprobs(e.logprobs(tok, c.prompt_logprobs, body.logprobs), logprobs)
            logprobs = CompletionLogprobs(**logprobs)
        out.append(
            CompletionChoice(
                index=i,
                text=(e.text if e else "") + c.text,
                logprobs=logprobs,
                finish_reason=finish_reason(c.finish_reason),
            )
        )
    return CompletionResponse(
        id=rid,
        created=created,
        model=model_name,
        choices=out,
        usage=Usage.of_choices(prompt_tokens, done, body.n),
    )


def _stream(
    handles,
    tok,
    body: CompletionRequest,
    echoed: list[EchoedPrompt | None],
    rid: str,
    created: int,
    model_name: str,
    prompt_tokens: int,
    include_usage: bool,
):
    builders = [
        CompletionLogprobBuilder(tok, body.logprobs or 0, offset=len(e.text) if e else 0) for e in echoed
    ]
    pending_echo = [e is not None for e in echoed]

    def delta(i, piece, reason):
        first = []
        if pending_echo[i]:  # the choice's first piece: the prompt (scored by now, when asked) goes first
            pending_echo[i] = False
            e = echoed[i]
            logprobs = (
                e.logprobs(tok, piece.prompt_logprobs, body.logprobs) if body.logprobs is not None else None
            )
            first.append({"index": i, "text": e.text, "logprobs": logprobs, "finish_reason": None})
        logprobs = builders[i].piece(piece) if body.logprobs is not None else None
        if not (piece.text or reason or (logprobs and logprobs["tokens"])):
            return first
        return first + [{"index": i, "text": piece.text, "logprobs": logprobs, "finish_reason": reason}]

    return event_stream(
        handles,
        object_name="text_completion",
        rid=rid,
        created=created,
        model_name=model_name,
        prompt_tokens=prompt_tokens,
        include_usage=include_usage,
        choice_delta=delta,
        n=body.n,
    )
