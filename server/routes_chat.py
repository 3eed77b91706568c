"""POST /v1/chat/completions: the messages go through the chat template into one prompt."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from .errors import invalid
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                       Usage, new_id, now)
from .routes_common import (EventStream, chat_logprobs, check_model, collect, encode_prompt, finish_reason,
                            event_stream, get_engine, max_new_tokens, sampling_params, submit_all)

router = APIRouter(dependencies=[Depends(require_api_key)])


def render_messages(request: Request, body_messages) -> str:
    template = request.app.state.chat_template
    try:
        return template.render([(m.role, m.text) for m in body_messages])
    except ValueError as e:
        bad = next((i for i, m in enumerate(body_messages) if m.role not in template.roles), None)
        raise invalid(str(e), None if bad is None else f"messages.{bad}.role") from None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model_name = check_model(request, body.model)
    if body.tools:
        raise invalid("tools are not supported", "tools")
    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    engine = get_engine(request)
    tok = engine.tokenizer
    ids = encode_prompt(tok, render_messages(request, body.messages), "messages")
    budget = max_new_tokens(request, engine, len(ids), body.wanted_max_tokens, "messages")
    top_n = body.top_logprobs or 0
    stops = request.app.state.chat_template.stop
    jobs = [(ids, sampling_params(body, engine, budget, i, extra_stop=stops, logprobs=top_n)) for i in range(body.n)]
    handles = submit_all(request, engine, jobs)
    rid, created = new_id("chatcmpl"), now()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_stream(handles, tok, body, rid, created, model_name, len(ids), include_usage))

    choices = await collect(request, handles)
    out = [ChatChoice(index=i, message=AssistantMessage(content=c.text),
                      logprobs=ChatLogprobs(**chat_logprobs(tok, c, top_n)) if body.logprobs else None,
                      finish_reason=finish_reason(c.finish_reason))
           for i, c in enumerate(choices)]
    completion_tokens = sum(c.completion_tokens for c in choices)
    return ChatCompletionResponse(id=rid, created=created, model=model_name, choices=out,
                                  usage=Usage(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                                              total_tokens=len(ids) + completion_tokens))


def _stream(handles, tok, body: ChatCompletionRequest, rid: str, created: int, model_name: str,
            prompt_tokens: int, include_usage: bool):
    top_n = body.top_logprobs or 0

    def delta(i, out, reason):
        logprobs = chat_logprobs(tok, out, top_n) if body.logprobs and out.token_ids else None
        if not (out.text or reason or logprobs):
            return None
        return {"index": i, "delta": {"content": out.text} if out.text else {}, "logprobs": logprobs,
                "finish_reason": reason}

    # OpenAI opens each choice with the role and empty content
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(len(handles))]
    return event_stream(handles, object_name="chat.completion.chunk", rid=rid, created=created,
                        model_name=model_name, prompt_tokens=prompt_tokens, include_usage=include_usage,
                        choice_delta=delta, opening=opening)
