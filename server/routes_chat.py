"""POST /v1/chat/completions: the messages go through the chat template into one prompt."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .api_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    Usage,
    new_id,
    now,
)
from .auth import require_api_key
from .chat_template import ChatTemplate
from .config import Settings
from .deps import check_model, get_chat_template, get_engine, get_settings
from .errors import invalid
from .fanout import collect, finish_reason, submit_all
from .logprobs import chat_logprobs
from .params import budget, check_fanout, choices, prediction_ids, prompt_ids_off_loop, render_messages
from .protocol import (
    ChatCompletionRequest,
)
from .sse import EventStream, event_stream
from .structured import constraint_of, prepare
from .tool_calls import ToolCallStream, ToolMode, tool_constraint

router = APIRouter(dependencies=[Depends(require_api_key)])

# the library's names of the fields this endpoint calls otherwise (see params.sampling_params)
NAMES = {"logprobs": "top_logprobs"}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    engine=Depends(get_engine),
    settings: Settings = Depends(get_settings),
    template: ChatTemplate = Depends(get_chat_template),
):
    model_name = check_model(settings, body.model)
    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs", code="invalid_combination")
    tok = engine.tokenizer
    check_fanout(engine, 1, body.n)
    constraint = constraint_of(body)
    for_tools, tool_mode = tool_constraint(body)
    if for_tools is not None and constraint is not None:
        raise invalid(
            f"tools and {constraint.param.split('.')[0]} both constrain the output; use one",
            "tool_choice",
            code="invalid_combination",
        )
    constraint = constraint or for_tools
    await prepare(engine, constraint, settings.constraint_timeout)
    (ids,) = await prompt_ids_off_loop(engine, [render_messages(template, body.messages)], "messages")
    predicted = await prediction_ids(engine, body.prediction)
    if body.max_completion_tokens is not None and body.max_tokens is not None:  # both must hold
        budget(engine, len(ids), body.max_tokens, settings.default_max_tokens)
    max_tokens = budget(engine, len(ids), body.wanted_max_tokens, settings.default_max_tokens)
    top_n = body.top_logprobs or 0
    jobs = choices(
        engine,
        body,
        ids,
        max_tokens,
        extra_stop=template.stop,
        logprobs=top_n,
        names=NAMES,
        constraint=constraint,
        prediction=predicted,
    )
    handles = submit_all(engine, jobs, settings.timeout)
    rid, created = new_id("chatcmpl"), now()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            _stream(handles, tok, body, rid, created, model_name, len(ids), include_usage, tool_mode),
            handles,
        )

    done = await collect(request, handles)
    out = []
    for i, c in enumerate(done):
        message, reason = AssistantMessage(content=c.text), finish_reason(c.finish_reason)
        if tool_mode is not None:
            message, reason = tool_mode.message(c)
            reason = finish_reason(reason)
        logprobs = ChatLogprobs(**chat_logprobs(tok, c, top_n)) if body.logprobs else None
        out.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason))
    return ChatCompletionResponse(
        id=rid, created=created, model=model_name, choices=out, usage=Usage.of_choices(len(ids), done, body.n)
    )


def _stream(
    handles,
    tok,
    body: ChatCompletionRequest,
    rid: str,
    created: int,
    model_name: str,
    prompt_tokens: int,
    include_usage: bool,
    tool_mode: ToolMode | None,
):
    top_n = body.top_logprobs or 0
    calls = [ToolCallStream(tool_mode) for _ in handles] if tool_mode is not None else None

    def delta(i, piece, reason):
        logprobs = chat_logprobs(tok, piece, top_n) if body.logprobs and piece.token_ids else None
        if calls is not None:
            content, reason = calls[i].delta(piece, reason)
        else:
            content = {"content": piece.text} if piece.text else {}
        if not (content or reason or logprobs):
            return None
        return {"index": i, "delta": content, "logprobs": logprobs, "finish_reason": reason}

    # OpenAI opens each choice with the role and empty content
    opening = [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(len(handles))
    ]
    return event_stream(
        handles,
        object_name="chat.completion.chunk",
        rid=rid,
        created=created,
        model_name=model_name,
        prompt_tokens=prompt_tokens,
        include_usage=include_usage,
        choice_delta=delta,
        opening=opening,
        n=body.n,
    )
