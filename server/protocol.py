"""Request bodies of the OpenAI-compatible API (pydantic models; the responses are in
`server/api_responses.py`).

Requests are validated strictly (no "5" for 5, no true for 1, no NaN or infinity), so a wrong
type is a 400 naming the field rather than a surprise further in. Unknown fields are ignored,
as OpenAI-compatible servers usually do, so clients that send extra options still work; the
options we cannot honour (`best_of` > n, `suffix`, tools, `echo` on chat) are rejected explicitly.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpt.sampling import MAX_LOGPROBS

from .strict import _Strict
from .structured import ChatToolFields, StructuredFields, ToolCallIn
from .unsupported import CHAT_UNSUPPORTED, COMPLETION_UNSUPPORTED, check_unsupported

MAX_N = 128  # choices per request; each one takes a batch slot
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # logit_bias entries, as OpenAI allows
MAX_BEAMS = 16  # a beam search holds this many KV-cache rows of its own
MAX_PROMPTS = 1024  # prompts in one /v1/completions request (times n: at most the queue)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenId = int  # within the vocabulary: gpt.SamplingParams.validate checks
TokenKey = Annotated[str, Field(pattern=r"^[0-9]+$", max_length=12)]
Bias = float  # in [-100, 100]: gpt.SamplingParams.validate checks


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="end the stream with a chunk carrying the usage")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Prediction(_Strict):
    """OpenAI's Predicted Outputs: text the output is expected to repeat for the most part."""

    type: Literal["content"] = Field(description="the only kind of prediction")
    content: str | list[TextPart] = Field(
        description="the predicted output; its tokens are drafts for speculative decoding"
    )

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(StructuredFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="the served model's name (optional: this server serves one)")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "new tokens at most; the prompt plus these must fit the model's context (a 400 names "
            "both numbers). "
            "Default: the server's --default-max-tokens, shrunk to the room left"
        ),
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 chooses the most likely token (greedy)")
    top_p: float = Field(
        1.0, gt=0, le=1, description="sample from the smallest set of tokens whose probability reaches top_p"
    )
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate for each prompt")
    stream: bool = Field(False, description="send the output as server-sent events while it is generated")
    stream_options: StreamOptions | None = Field(None, description="with stream only")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None,
        description=f"up to {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters; the output ends "
        f"before the first one that appears, which is not included",
    )
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="token ids that end the output like end-of-text (the token is not shown); extension"
    )
    seed: int | None = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description=(
            "makes sampling reproducible: the same request gives the same output, alone or under load"
        ),
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="subtracted once from every token already generated"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="subtracted per occurrence from every token already generated"
    )
    logit_bias: Annotated[dict[TokenKey, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        None,
        description=f"token id (as a string) -> a bias in [-100, 100] added to its logit; at most "
        f"{MAX_LOGIT_BIAS} entries, ids within the tokenizer's vocabulary",
    )
    user: str | None = Field(None, description="accepted and ignored")
    # extensions (vLLM's names); the openai client sends them with extra_body=
    top_k: int = Field(0, ge=-1, description="sample among the k most likely tokens; 0 or -1: off; extension")
    min_p: float = Field(
        0.0, ge=0, le=1, description="drop tokens less likely than min_p times the most likely one; extension"
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0,
        le=10,
        description=(
            "divides positive and multiplies negative logits of tokens in the prompt or output; 1: "
            "off; extension"
        ),
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="end-of-text and stop_token_ids cannot end the output before "
        "this many tokens (stop strings still can); extension",
    )
    ignore_eos: bool = Field(False, description="keep generating past end-of-text; extension")
    prediction: Prediction | None = Field(
        None,
        description="text the output is expected to repeat (a file rewritten with a few changes): "
        "speculative decoding drafts from it, which is faster where it matches and never changes the "
        "output; at most the model's context in tokens; ignored when the server runs with "
        "--speculative off; not with num_beams > 1",
    )
    num_beams: int = Field(
        1,
        ge=1,
        le=MAX_BEAMS,
        description=(
            "> 1: beam search with this many beams, and the n best beams are the choices (n <= num_beams). "
            "Deterministic (temperature, top_k/top_p/min_p and seed do not apply; penalties and "
            "logit_bias do), "
            "not streamed, no logprobs; extension"
        ),
    )
    length_penalty: float = Field(
        1.0,
        ge=-10,
        le=10,
        description=(
            "beam search ranks a finished beam by its logprob / length ** length_penalty (> 1 favours longer "
            "output); extension"
        ),
    )

    _unsupported = model_validator(mode="before")(check_unsupported)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sizes(cls, v):  # the limits, in words clearer than a union's type errors
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):  # as a list (gpt.SamplingParams drops empty strings and repeats)
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys(cls, v):  # in words clearer than a pattern mismatch
        if isinstance(v, dict):
            if len(v) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
            bad = next((k for k in v if not (isinstance(k, str) and k.isascii() and k.isdigit())), None)
            if bad is not None:
                raise ValueError(f"keys must be token ids (integers as strings), got {bad!r}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        return None if v is None else {int(key): float(bias) for key, bias in v.items()}

    @model_validator(mode="after")
    def _combinations(self):
        def bad(name, why):
            return PydanticCustomError("invalid_combination", why, {"name": name})

        if self.stream_options is not None and not self.stream:
            raise bad("stream_options", "only allowed when stream is true")
        if self.num_beams > 1:
            if self.stream:
                raise bad("stream", "beam search (num_beams > 1) is not streamed")
            if getattr(self, "logprobs", None) not in (None, False):
                raise bad("logprobs", "logprobs are not reported for beam search (num_beams > 1)")
        elif self.length_penalty != 1.0:
            raise bad("length_penalty", "length_penalty applies to beam search: set num_beams > 1")
        return self


PROMPT_SCHEMA = {
    "description": "a string, a list of token ids, a list of strings or a list of token-id lists (a batch, "
    f"at most {MAX_PROMPTS} prompts); none empty, each must leave room in the model's context",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
    ],
}


class CompletionRequest(SamplingFields):
    prompt: Annotated[
        Any, WithJsonSchema(PROMPT_SCHEMA)
    ]  # checked and made a list of prompts by parse_prompt
    max_tokens: int | None = Field(
        None,
        ge=0,
        description=(
            SamplingFields.model_fields["max_tokens"].description
            + ". 0 only with echo: the prompt, nothing generated"
        ),
    )
    logprobs: int | None = Field(
        None,
        description=f"each token's logprob and this many likeliest alternatives (0-{MAX_LOGPROBS}); "
        "with echo, the prompt's first (its first token's are null)",
    )
    echo: bool | None = Field(
        False, description="prepend the prompt (ids as their text); streamed: a first chunk"
    )
    best_of: int | None = Field(None, ge=1, description="only equal to n")
    suffix: Literal[""] | None = Field(None, description="insertion is not supported")

    @model_validator(mode="before")
    @classmethod
    def _completion_unsupported(cls, data):
        return check_unsupported(data, COMPLETION_UNSUPPORTED)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return parse_prompt(v)


def parse_prompt(v) -> list[str | list[int]]:
    """OpenAI's four prompt shapes -> a list of prompts, each a string or a list of token ids."""

    def is_ids(x) -> bool:
        return isinstance(x, list) and all(type(t) is int for t in x)

    if isinstance(v, list) and len(v) > MAX_PROMPTS and not all(type(t) is int for t in v):
        raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
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
        raise ValueError(
            "must be a string, a list of token ids, a list of strings or a list of token-id lists"
        )
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
    return prompts


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="\"tool\": a tool call's result (the chat template's tool role)"
    )
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(
        None,
        description="an assistant message's calls, rendered as the JSON list a required tool call writes",
    )
    tool_call_id: str | None = Field(None, description="a tool message's call; accepted, not rendered")

    @property
    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content)
        if self.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                for c in self.tool_calls
            ]
            text += json.dumps(calls, separators=(",", ":"), ensure_ascii=False)
        return text


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class ChatCompletionRequest(SamplingFields, ChatToolFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = Field(False, description="report each output token's logprob")
    top_logprobs: int | None = Field(
        None, description=f"and this many most likely alternatives (0-{MAX_LOGPROBS}; needs logprobs)"
    )

    @model_validator(mode="before")
    @classmethod
    def _chat_unsupported(cls, data):
        return check_unsupported(data, CHAT_UNSUPPORTED)

    @property
    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizePrompt(_Strict):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None


class TokenizeChat(_Strict):
    """A chat's messages, tokenized as the chat template renders them."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None


TokenizeRequest = TokenizePrompt | TokenizeChat


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: str | None = None
