"""The OpenAPI schema, made to tell the truth about what the running server accepts.

FastAPI derives the schema from the pydantic models, which know the static limits. This adds
what only the running server knows, so a client generated from the schema (or a fuzzer like
schemathesis) sends what is accepted:

- the served model's name, the tokenizer's id range (prompt ids, logit_bias keys,
  stop_token_ids), the context's room for max_tokens, and n within the queue;
- the fields the server refuses rather than ignores (server/unsupported.py), each with the only
  values it accepts, instead of leaving them to "additional properties".

What JSON Schema cannot say is in the descriptions and comes back as a 400 with code
"context_length_exceeded" (a prompt and max_tokens that do not fit together) or
"invalid_combination" (fields that are each valid but not together, like min_tokens over
max_tokens, or a completion's max_tokens 0 without echo).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gpt.sampling import MAX_LOGPROBS

from .unsupported import CHAT_UNSUPPORTED, COMPLETION_UNSUPPORTED, UNSUPPORTED

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS = {
    400: "a malformed or unservable request",
    401: "a missing or wrong API key",
    404: "an unknown model or route",
    408: "the body did not arrive in time",
    413: "the body is larger than --max-body-bytes",
    415: "the body is not JSON",
    429: "the queue is full (see Retry-After)",
    500: "the engine failed",
    503: "the model is loading, the server is draining or the engine stopped",
}


def below(n: int) -> str:
    """A regular expression for the decimal numbers in [0, n) (no leading zeros beyond n's width)."""
    digits = str(n)
    alts = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    for i, ch in enumerate(digits):
        if ch != "0":
            rest = len(digits) - i - 1
            alts.append(digits[:i] + f"[0-{int(ch) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(" + "|".join(alts) + ")$"


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _document_errors(schema)
        _document_unsupported(schema)
        engine = app.state.engine
        if engine is not None:
            _fill_limits(schema, app.state.settings.model_name, engine)
        return schema  # not cached: the model may load after the first request

    app.openapi = openapi


def _document_errors(schema: dict) -> None:
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400s here
            for status, why in _ERRORS.items():
                if method == "get" and status in (408, 413, 415):
                    continue
                responses.setdefault(
                    str(status), {"description": why, "content": {"application/json": {"schema": ref}}}
                )
            if path in ("/v1/completions", "/v1/chat/completions"):
                ok = responses["200"].setdefault("content", {})
                ok["text/event-stream"] = {
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": {"type": "string"}},
                        "description": "with stream: server-sent events, each `data: <chunk JSON>` (an error "
                        "object if the engine fails), then `data: [DONE]`",
                    }
                }


def _document_unsupported(schema: dict) -> None:
    models = schema["components"]["schemas"]
    for name, table in (
        ("CompletionRequest", {**UNSUPPORTED, **COMPLETION_UNSUPPORTED}),
        ("ChatCompletionRequest", {**UNSUPPORTED, **CHAT_UNSUPPORTED}),
    ):
        props = models.get(name, {}).get("properties")
        if props is None:
            continue
        for field, (accepted, why) in table.items():
            if field not in props:
                props[field] = {
                    "enum": [None, *accepted],
                    "description": f"{why}: only these values" if why else "accepted and ignored",
                }


def _fill_limits(schema: dict, model_name: str, engine) -> None:
    limits, models = engine.limits, schema["components"]["schemas"]
    vocab = limits.vocab_size
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "TokenizePrompt",
        "TokenizeChat",
        "DetokenizeRequest",
    ):
        props = models.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {
                "anyOf": [{"enum": [model_name]}, {"type": "null"}],
                "description": "the served model's name (optional)",
            }
        for field in ("max_tokens", "max_completion_tokens"):
            if (
                field in props
            ):  # the model's minimum (0 for a completion's max_tokens, with echo), the room left
                low = min((node.get("minimum", 1) for node in _walk(props[field])), default=1)
                props[field] = {
                    "anyOf": [
                        {"type": "integer", "minimum": low, "maximum": limits.room(1)},
                        {"type": "null"},
                    ],
                    "description": props[field].get("description", ""),
                }
        if "n" in props:
            props["n"]["maximum"] = min(props["n"].get("maximum", engine.max_queue), engine.max_queue)
        if "top_k" in props:
            props["top_k"]["maximum"] = vocab
        for node in _walk(props.get("logprobs", {})) + _walk(props.get("top_logprobs", {})):
            node["minimum"], node["maximum"] = 0, MAX_LOGPROBS  # gpt.SamplingParams.validate's limit
        for key in (
            _walk(props.get("prompt", {}))
            + _walk(props.get("stop_token_ids", {}))
            + _walk(props.get("allowed_token_ids", {}))
            + _walk(props.get("tokens", {}))
        ):
            key["minimum"], key["maximum"] = 0, vocab - 1
        for bias in _objects(props.get("logit_bias", {})):
            bias["propertyNames"] = {"pattern": below(vocab)}


def _walk(node) -> list[dict]:
    """Every integer schema inside `node` (token ids)."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "integer":
            found.append(node)
        for v in node.values():
            found += _walk(v)
    elif isinstance(node, list):
        for v in node:
            found += _walk(v)
    return found


def _objects(node) -> list[dict]:
    return [n for n in _all(node) if n.get("type") == "object"]


def _all(node) -> list[dict]:
    out = [node] if isinstance(node, dict) else []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for v in children:
        out += _all(v)
    return out
