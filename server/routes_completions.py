"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from .config import Settings
from .deps import check_model, get_engine, get_settings
from .errors import invalid
from .fanout import collect, finish_reason, submit_all
from .logprobs import CompletionLogprobBuilder
from .params import budget, check_fanout, choices, prompt_ids_off_loop
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage, new_id, now
from .sse import EventStream, event_stream

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request, engine=Depends(get_engine),
                            settings: Settings = Depends(get_settings)):
    model_name = check_model(settings, body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of other than n is not supported", "best_of", code="invalid_combination")
    tok = engine.tokenizer
    check_fanout(engine, len(body.prompt), body.n)
    prompts = await prompt_ids_off_loop(engine, body.prompt, "prompt")
    jobs = []
    for ids in prompts:
        max_tokens = budget(engine, len(ids), body.max_tokens, settings.default_max_tokens)
        jobs += choices(engine, body, ids, max_tokens, logprobs=body.logprobs or 0)
    handles = submit_all(engine, jobs, settings.timeout)
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid, created = new_id("cmpl"), now()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_stream(handles, tok, body, rid, created, model_name, prompt_tokens, include_usage), handles)

    done = await collect(request, handles)
    out = []
    for i, c in enumerate(done):
        logprobs = None
        if body.logprobs is not None:  # the whole choice as one piece
            logprobs = CompletionLogprobs(**CompletionLogprobBuilder(tok, body.logprobs).piece(c))
        out.append(CompletionChoice(index=i, text=c.text, logprobs=logprobs,
                                    finish_reason=finish_reason(c.finish_reason)))
    completion_tokens = sum(c.completion_tokens for c in done)
    cached = sum(c.cached_tokens for c in done[::body.n])  # each prompt counted once, like prompt_tokens
    return CompletionResponse(id=rid, created=created, model=model_name, choices=out,
                              usage=Usage.of(prompt_tokens, completion_tokens, cached))


def _stream(handles, tok, body: CompletionRequest, rid: str, created: int, model_name: str,
            prompt_tokens: int, include_usage: bool):
    builders = [CompletionLogprobBuilder(tok, body.logprobs or 0) for _ in handles]

    def delta(i, piece, reason):
        logprobs = builders[i].piece(piece) if body.logprobs is not None else None
        if not (piece.text or reason or (logprobs and logprobs["tokens"])):
            return None
        return {"index": i, "text": piece.text, "logprobs": logprobs, "finish_reason": reason}

    return event_stream(handles, object_name="text_completion", rid=rid, created=created, model_name=model_name,
                        prompt_tokens=prompt_tokens, include_usage=include_usage, choice_delta=delta, n=body.n)
