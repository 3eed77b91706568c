"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from .errors import invalid
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage, new_id, now
from .routes_common import (CompletionLogprobBuilder, EventStream, check_model, collect, encode_prompt,
                            event_stream, finish_reason, get_engine, max_new_tokens, sampling_params, submit_all)

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request):
    model_name = check_model(request, body.model)
    if body.echo:
        raise invalid("echo is not supported", "echo")
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of other than n is not supported", "best_of")
    engine = get_engine(request)
    tok = engine.tokenizer
    prompts = [encode_prompt(tok, p, "prompt") for p in body.prompt]
    jobs = []
    for ids in prompts:
        budget = max_new_tokens(request, engine, len(ids), body.max_tokens, "prompt")
        for i in range(body.n):
            jobs.append((ids, sampling_params(body, engine, budget, i, logprobs=body.logprobs or 0)))
    handles = submit_all(request, engine, jobs)
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid, created = new_id("cmpl"), now()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_stream(handles, tok, body, rid, created, model_name, prompt_tokens, include_usage))

    choices = await collect(request, handles)
    out = []
    for i, c in enumerate(choices):
        logprobs = None
        if body.logprobs is not None:  # the whole choice as one piece
            logprobs = CompletionLogprobs(**CompletionLogprobBuilder(tok, body.logprobs).piece(c))
        out.append(CompletionChoice(index=i, text=c.text, logprobs=logprobs,
                                    finish_reason=finish_reason(c.finish_reason)))
    completion_tokens = sum(c.completion_tokens for c in choices)
    return CompletionResponse(id=rid, created=created, model=model_name, choices=out,
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          total_tokens=prompt_tokens + completion_tokens))


def _stream(handles, tok, body: CompletionRequest, rid: str, created: int, model_name: str,
            prompt_tokens: int, include_usage: bool):
    builders = [CompletionLogprobBuilder(tok, body.logprobs or 0) for _ in handles]

    def delta(i, out, reason):
        logprobs = builders[i].piece(out) if body.logprobs is not None else None
        if not (out.text or reason or (logprobs and logprobs["tokens"])):
            return None
        return {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": reason}

    return event_stream(handles, object_name="text_completion", rid=rid, created=created, model_name=model_name,
                        prompt_tokens=prompt_tokens, include_usage=include_usage, choice_delta=delta)
