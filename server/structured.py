"""Structured output in the API: the request fields that constrain the output, and the one
`gpt.Constraint` a request's fields make.

- OpenAI's `response_format`: `{"type": "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs` (one of `json`, `regex`, `choice`, `grammar`, `json_object`) and
  its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- chat's `tools` with `tool_choice` "required" or a named function (server/tool_calls.py shapes
  the reply); "none" ignores the tools;
- vLLM's `allowed_token_ids` and `bad_words`, plain masks on the same path.

A request may constrain its output one way only. The constraint is compiled before the request
takes a slot, off the event loop and the engine's thread, with a deadline (`prepare`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from gpt import Constraint, RequestError
from gpt.constraints import CACHE

from .errors import from_request_error, invalid
from .strict import _Strict

NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for schema and function names
MAX_TOOLS = 128
MAX_BAD_WORDS = 256
MAX_ALLOWED_TOKEN_IDS = 1 << 20
JsonSchema = dict[str, Any]
BadWord = Annotated[str, Field(min_length=1)]


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"] = Field(description="any JSON object (JSON mode)")


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=NAME, description="the schema's name (letters, digits, _ and -)")
    description: str | None = Field(None, description="accepted; not shown to the model")
    schema_: JsonSchema | None = Field(
        None, alias="schema", description="the JSON schema the output must satisfy; absent: any JSON"
    )
    strict: bool | None = Field(None, description="accepted: the output always follows the schema")


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(_Strict):
    """vLLM's structured outputs: exactly one field."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    json_: JsonSchema | str | None = Field(None, alias="json", description="a JSON schema (or its text)")
    regex: str | None = Field(None, description="the whole output matches this regular expression")
    choice: list[str] | None = Field(None, min_length=1, description="the output is one of these strings")
    grammar: str | None = Field(None, description="a Lark or GBNF (llama.cpp) grammar")
    json_object: bool | None = Field(None, description="true: any JSON object")


class FunctionSpec(_Strict):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: JsonSchema | None = Field(None, description="JSON schema of the arguments; absent: an object")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCallIn(_Strict):
    """An earlier reply's tool call, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class StructuredFields(_Strict):
    """The fields both endpoints take."""

    response_format: ResponseFormat | None = Field(
        None,
        description='{"type": "text"} (default), {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name", "schema"}}: the output is valid JSON, against the schema when given',
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="one of json, regex, choice, grammar or json_object; extension (vLLM's)"
    )
    guided_json: JsonSchema | str | None = Field(None, description="as structured_outputs.json; extension")
    guided_regex: str | None = Field(None, description="as structured_outputs.regex; extension")
    guided_choice: list[str] | None = Field(None, description="as structured_outputs.choice; extension")
    guided_grammar: str | None = Field(None, description="as structured_outputs.grammar; extension")
    allowed_token_ids: Annotated[list[int], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None = (
        Field(None, description="only these token ids may be generated; extension")
    )
    bad_words: Annotated[list[BadWord], Field(max_length=MAX_BAD_WORDS)] | None = Field(
        None, description="words never generated, alone or after a space; extension"
    )


# "auto" is read (to refuse it with a reason) but not offered
TOOL_CHOICE_SCHEMA = {
    "anyOf": [
        {"enum": ["none", "required"]},
        {
            "type": "object",
            "properties": {
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
        {"type": "null"},
    ]
}


class ChatToolFields(_Strict):
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="functions the reply may call; used with tool_choice required or a named function"
    )
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None, WithJsonSchema(TOOL_CHOICE_SCHEMA)
    ] = Field(
        None,
        description='"required": the reply calls one or more of the tools; {"type": "function", "function": '
        '{"name"}}: it calls that one; "none": the tools are ignored. "auto" is not supported',
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (with required)")


def constraint_of(body) -> Constraint | None:
    """The constraint a request's fields ask for, if any; a 400 when they ask for two, or for
    something malformed. Tool calls are not among these: see server/tool_calls.py."""
    found: list[tuple[str, Constraint]] = []
    try:
        rf = body.response_format
        if isinstance(rf, JsonObjectFormat):
            found.append(("response_format", Constraint.json_object("response_format")))
        elif isinstance(rf, JsonSchemaFormat):
            schema = rf.json_schema.schema_
            param = "response_format.json_schema.schema"
            found.append(("response_format", Constraint.json_schema(schema if schema else {}, param)))
        so = body.structured_outputs
        if so is not None:
            given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
            given += ["json_object"] if so.json_object else []
            if len(given) != 1:
                names = ", ".join(k.rstrip("_") for k in given) or "nothing"
                raise invalid(
                    f"give exactly one of json, regex, choice, grammar or json_object; got {names}",
                    "structured_outputs",
                    code="invalid_combination",
                )
            kind = given[0]
            param = f"structured_outputs.{kind.rstrip('_')}"
            found.append(("structured_outputs", _make(kind, getattr(so, kind), param)))
        for field, kind in (
            ("guided_json", "json_"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(body, field)
            if value is not None:
                found.append((field, _make(kind, value, field)))
    except RequestError as e:
        raise from_request_error(e) from None
    if len(found) > 1:
        raise invalid(
            f"{found[0][0]} and {found[1][0]} both constrain the output; use one",
            found[1][0],
            code="invalid_combination",
        )
    return found[0][1] if found else None


def _make(kind: str, value, param: str) -> Constraint:
    if kind == "json_":
        return Constraint.json_schema(value, param)
    if kind == "json_object":
        return Constraint.json_object(param)
    return {"regex": Constraint.regex, "choice": Constraint.choice, "grammar": Constraint.grammar}[kind](
        value, param
    )


_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="constraint-compile")


async def prepare(engine, constraint: Constraint | None, timeout: float) -> None:
    """Compile a request's constraint before it takes a slot: from the cache, or on a compile
    thread (llguidance releases the GIL), so neither the event loop nor the engine waits. A
    constraint that is invalid, or takes longer than `timeout` seconds, is a 400 naming its
    field. Counted by kind; compile times observed."""
    if constraint is None:
        return
    metrics = engine.metrics
    metrics.constrained_requests_total.labels(kind=constraint.kind).inc()
    cached = (constraint, engine.tokenizer) in CACHE
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(_POOL, constraint.compile, engine.tokenizer)
    try:
        compiled = await asyncio.wait_for(asyncio.shield(job), timeout)
    except asyncio.TimeoutError:
        # the compile thread finishes on its own (llguidance's limits bound it); the result is cached
        raise invalid(
            f"did not compile within {timeout:g} s; simplify it (or retry, if the server is busy)",
            constraint.param,
            code="constraint_too_complex",
        ) from None
    except RequestError as e:
        raise from_request_error(e) from None
    if not cached:
        metrics.constraint_compile_seconds.observe(compiled.seconds)
