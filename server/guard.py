"""ASGI middleware that vets a request's body before any route sees it.

- A POST to a route that takes JSON must say `Content-Type: application/json` (415 otherwise). Browsers send
  the three "simple" types (form, multipart, text/plain) cross-site without asking CORS first,
  so refusing them keeps a page on another site from driving a key-less server blind.
- The body may hold at most `max_bytes` (413): a declared Content-Length over the limit is
  refused before a byte is read, a chunked body as soon as it passes the limit.
- The whole body must arrive within `timeout` seconds (408), so a client that trickles its
  body cannot hold a connection and a half-read buffer for ever.

The body is read here, bounded, and replayed to the app; after it, the app reads the client's
messages directly (it watches for a disconnect while it streams).
"""

from __future__ import annotations

import asyncio

from .errors import APIError

JSON_TYPES = ("application/json",)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    def __init__(self, app, max_bytes: int, timeout: float, json_paths: frozenset[str]):
        self.app, self.max_bytes, self.timeout, self.json_paths = app, max_bytes, timeout, json_paths

    async def __call__(self, scope, receive, send):
        # other requests' bodies are never read: the router answers 404 or 405 without them
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.json_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            if not _is_json(headers.get(b"content-type")):
                raise APIError(
                    415,
                    "send the body as JSON with 'Content-Type: application/json'",
                    code="unsupported_media_type",
                )
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large()
            body = await self._read(receive)
        except APIError as e:
            # the client may still be sending: ask it to close instead of reading the rest
            response = e.response()
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        if body is None:  # the client went away mid-body
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
            code="request_too_large",
        )

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0

        async def read_all() -> bytes | None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            return await asyncio.wait_for(read_all(), self.timeout)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {self.timeout:g} seconds",
                code="request_timeout",
            ) from None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
