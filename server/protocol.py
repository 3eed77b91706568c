"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests are validated strictly (no "5" for 5, no true for 1, no NaN or infinity), so a wrong
type is a 400 naming the field rather than a surprise further in. Unknown fields are ignored,
as OpenAI-compatible servers usually do, so clients that send extra options still work; the
options we cannot honour (`echo`, `best_of` > n, `suffix`, tools) are rejected explicitly.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 128  # choices per request; each one takes a batch slot
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Optional[str] = None  # the served model's name; optional here, unlike OpenAI
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions (vLLM's names); the openai client sends them with extra_body=
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return None
        out = {}
        for key, bias in v.items():
            try:
                tok = int(key)
            except ValueError:
                raise ValueError(f"keys must be token ids (integers as strings), got {key!r}") from None
            if tok < 0:
                raise ValueError(f"token id {tok} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias for token {tok} must be in [-100, 100], got {bias}")
            out[tok] = float(bias)
        return out


class CompletionRequest(SamplingFields):
    prompt: Any  # str | list[int] | list[str] | list[list[int]]; checked by prompts()
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return parse_prompt(v)


def parse_prompt(v) -> list[Union[str, list[int]]]:
    """OpenAI's four prompt shapes -> a list of prompts, each a string or a list of token ids."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and all(type(t) is int for t in x)

    if isinstance(v, str):
        prompts = [v]
    elif is_ids(v) and v:
        prompts = [v]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        prompts = list(v)
    elif isinstance(v, list) and v and all(is_ids(p) for p in v):
        prompts = list(v)
    elif isinstance(v, list) and not v:
        raise ValueError("the prompt is empty")
    else:
        raise ValueError("must be a string, a list of token ids, a list of strings or a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
    return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Any]] = None

    @property
    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None  # tokenize a chat as the template renders it
    model: Optional[str] = None


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: Optional[str] = None


# --- responses --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache, not computed again")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


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
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
