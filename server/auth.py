"""API-key check, as a FastAPI dependency for the routers that need it.

Clients send `Authorization: Bearer <key>` (what the openai client does with `api_key=`).
The comparison runs in constant time so response timing does not reveal how much of a guessed
key was right. /health, /ready, /metrics and the web page do not depend on this.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = _bearer(request)
    if given is None:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Starlette decodes header bytes as latin-1; re-encoding gives back the raw bytes, which
    # compare with the configured key's UTF-8 bytes (compare_digest wants equal types).
    if not hmac.compare_digest(given.encode("latin-1"), expected.encode("utf-8")):
        raise APIError(
            401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
