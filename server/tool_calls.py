"""Tool calls: chat's `tools` with `tool_choice` "required" or a named function become a JSON
constraint, and the constrained output becomes OpenAI's `tool_calls`.

- a named function: the output is that function's arguments, an object valid against its
  `parameters`; it is streamed as the call's argument fragments;
- "required": the output is a JSON list of one or more `{"name", "arguments"}` objects, each
  valid against the named tool's `parameters` (`parallel_tool_calls: false`: exactly one); it is
  sent as whole calls once complete.

The reply's `finish_reason` is "tool_calls". Cut short by max_tokens, a named call keeps its
partial arguments with "length"; an incomplete list of calls is returned as content instead.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from gpt import Constraint, Piece, RequestError

from .api_responses import AssistantMessage, FunctionCall, ToolCall
from .errors import from_request_error, invalid

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolMode:
    """How a request's output becomes tool calls: one named function's arguments, or a list."""

    function: str | None  # the named function; None: "required" (a list of calls)

    def message(self, piece: Piece) -> tuple[AssistantMessage, str]:
        """A finished choice's whole output as the assistant message and its finish reason."""
        if self.function is not None:
            call = ToolCall(id=call_id(), function=FunctionCall(name=self.function, arguments=piece.text))
            reason = "tool_calls" if piece.finish_reason == "stop" else piece.finish_reason
            return AssistantMessage(content=None, tool_calls=[call]), reason
        calls = self.parse(piece)
        if calls is None:
            return AssistantMessage(content=piece.text), piece.finish_reason
        return AssistantMessage(content=None, tool_calls=calls), "tool_calls"

    def parse(self, piece: Piece) -> list[ToolCall] | None:
        """The calls of a finished "required" output, or None when it did not complete."""
        if piece.finish_reason != "stop":
            return None
        try:
            items = json.loads(piece.text)
        except ValueError:  # a stop string cut the list short
            return None
        calls = [FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"])) for c in items]
        return [ToolCall(id=call_id(), function=f) for f in calls]


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_constraint(body) -> tuple[Constraint | None, ToolMode | None]:
    """The constraint and reply shape of a chat request's tools; (None, None) when the output is
    not tool calls (no tools, or tool_choice "none"). A 400 for what cannot be honoured."""
    tools, choice = body.tools or [], body.tool_choice
    if choice is None and not tools:
        return None, None
    if choice == "none":
        return None, None
    if not tools:
        raise invalid("tool_choice needs tools", "tool_choice", code="invalid_combination")
    if choice is None or choice == "auto":
        raise invalid(
            'tool_choice "auto" is not supported: this server cannot let the model choose between '
            'text and a call honestly; send "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
            code="unsupported_parameter" if choice == "auto" else "invalid_combination",
        )
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("two tools have the same name", "tools", code="invalid_combination")
    try:
        if choice == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t.function.name},
                        "arguments": t.function.parameters or ANY_OBJECT,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in tools
            ]
            items = calls[0] if len(calls) == 1 else {"anyOf": calls}
            schema = {"type": "array", "items": items, "minItems": 1}
            if body.parallel_tool_calls is False:
                schema["maxItems"] = 1
            return Constraint.json_schema(schema, "tools"), ToolMode(None)
        name = choice.function.name
        if name not in names:
            known = ", ".join(names)
            raise invalid(
                f"no tool is named {name!r}; tools: {known}",
                "tool_choice.function.name",
                code="invalid_combination",
            )
        i = names.index(name)
        params = tools[i].function.parameters or ANY_OBJECT
        return Constraint.json_schema(params, f"tools.{i}.function.parameters"), ToolMode(name)
    except RequestError as e:
        raise from_request_error(e) from None


class ToolCallStream:
    """A streamed choice's deltas as tool calls: a named call's opening (id, name) and then its
    argument fragments; "required" calls whole, once the list completes."""

    def __init__(self, mode: ToolMode):
        self.mode, self.opened, self.text = mode, False, ""

    def delta(self, piece: Piece, reason: str | None) -> tuple[dict, str | None]:
        """The delta for one piece, and the finish reason to send with it."""
        if self.mode.function is not None:
            out = {}
            if not self.opened:
                self.opened = True
                out = {"index": 0, "id": call_id(), "type": "function"}
                out["function"] = {"name": self.mode.function, "arguments": piece.text}
            elif piece.text:
                out = {"index": 0, "function": {"arguments": piece.text}}
            return ({"tool_calls": [out]} if out else {}), ("tool_calls" if reason == "stop" else reason)
        self.text += piece.text
        if reason is None:
            return {}, None
        calls = self.mode.parse(Piece(self.text, finish_reason=reason))
        if calls is None:
            return ({"content": self.text} if self.text else {}), reason
        return {"tool_calls": [{"index": j, **c.model_dump()} for j, c in enumerate(calls)]}, "tool_calls"
