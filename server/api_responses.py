"""Response bodies of the OpenAI-compatible API (pydantic models); the request bodies are in
`server/protocol.py`."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0, description="prompt tokens served from the prefix cache, not computed again"
    )


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = Field(
        0, description="tokens of the request's `prediction` that the output took (drafted and kept)"
    )
    rejected_prediction_tokens: int = Field(
        0,
        description="tokens of the `prediction` that were drafted and not kept (OpenAI bills them as "
        "completion tokens; completion_tokens here counts the output's tokens only)",
    )
    reasoning_tokens: int = Field(0, description="always 0: this model does not reason")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()

    @classmethod
    def of(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        accepted: int = 0,
        rejected: int = 0,
    ) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=accepted, rejected_prediction_tokens=rejected
            ),
        )

    @classmethod
    def of_choices(cls, prompt_tokens: int, choices, n: int) -> Usage:
        """The usage of a request's choices (each choice's last or merged `gpt.Piece`), `n` per
        prompt: a prompt's cached tokens counted once, from its first choice, like its tokens."""
        return cls.of(
            prompt_tokens,
            sum(c.completion_tokens for c in choices),
            sum(c.cached_tokens for c in choices[::n]),
            sum(c.accepted_prediction_tokens for c in choices),
            sum(c.rejected_prediction_tokens for c in choices),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # with echo, the first prompt token's is null
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text, valid against the function's parameters")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the reply; null when it is tool calls")
    tool_calls: list[ToolCall] | None = Field(
        None, description='with tool_choice "required" or a named function: the calls'
    )


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt-serve"
    max_model_len: int = Field(description="the model's context in tokens (0 while it loads); extension")
    suggested_mode: Literal["completion", "chat"] = Field(
        description=(
            'how the model is best used; extension. "chat" when the server was started with --chat-template '
            '(the operator gave the model a chat format), else "completion": a model that continues '
            "text, best "
            "prompted through /v1/completions (/v1/chat/completions still works, through the "
            "plain-text default "
            "template). The web page at / opens in this mode."
        )
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
