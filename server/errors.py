"""OpenAI's error object for every failure: {"error": {"message", "type", "param", "code"}}.

Routes raise `APIError`; the handlers installed here also turn FastAPI's validation errors,
Starlette's HTTP exceptions (unknown route, wrong method, unparsable body), the library's
`gpt.RequestError` (a prompt or budget that does not fit: `from_request_error`) and anything
unexpected into that shape, so a client never sees a traceback or a non-OpenAI body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt import RequestError

log = logging.getLogger("server")

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to send to the client as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODE_BY_STATUS.get(
            status, "invalid_request" if status < 500 else "internal_error"
        )
        self.type = type or _TYPE_BY_STATUS.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_request_error(e: RequestError, names: Mapping[str, str] | None = None) -> APIError:
    """The library's verdict on a request (gpt.ContextLimits: an empty or too long prompt, max_tokens
    beyond the context; gpt.SamplingParams.validate: a field out of range or outside the
    vocabulary) as a 400 with its param and code. `names`: the library's field names as the
    API's ({"max_new_tokens": "max_tokens"})."""
    if names:
        e = e.renamed(names)
    return invalid(e.message, e.param, code=e.code)


def engine_closed(e) -> APIError:
    """The engine's refusal (`server.engine.EngineClosed`: dead or shutting down) as a 503 with
    its own message and code, whichever route meets it."""
    return APIError(503, e.message, code=e.code)


def _param(loc: tuple) -> str | None:
    # ("body", "messages", 0, "role") -> "messages.0.role"; pydantic adds the names of union
    # members and validator wrappers to the path, which mean nothing to a client.
    parts = [
        str(p)
        for p in loc
        if p != "body"
        and not (
            isinstance(p, str)
            and ("[" in p or p in _TYPE_TAGS or p.startswith(("constrained-", "function-")))
        )
    ]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}

_CODE_BY_PYDANTIC = {
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "model_attributes_type": "invalid_type",
    "dict_type": "invalid_type",
    "unsupported": "unsupported_parameter",
    "invalid_combination": "invalid_combination",
}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI/pydantic's error list -> one 400 naming the first offending field."""
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first.get("msg", "")
        return invalid(f"the request body is not valid JSON: {detail}", code="invalid_json")
    # a check of the whole body (an unsupported field) names its field in the context
    param = _param(tuple(first.get("loc", ()))) or first.get("ctx", {}).get("name")
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):  # our own validators' messages
        msg = msg[len("Value error, ") :]
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return invalid("the request body must be a JSON object", code="invalid_type")
    code = _CODE_BY_PYDANTIC.get(kind) or ("invalid_type" if kind.endswith("_type") else "invalid_value")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return invalid(message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return from_request_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and "parsing the body" in detail:
            # FastAPI's answer to a body that is not UTF-8 (json.loads raised UnicodeDecodeError)
            detail = "the request body is not valid UTF-8 JSON"
        elif exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, detail, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})").response()
