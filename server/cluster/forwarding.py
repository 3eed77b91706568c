"""An HTTP request carried from the ingress to a model replica, and played there against the
replica's own FastAPI app as the ASGI server would play it.

The replica runs today's app unchanged (routes, auth, limits, errors, streaming), so a request
through Ray gets exactly what `gpt-serve` alone would answer. The reply comes back as a stream:
one `ResponseStart` (status and headers), then the body's chunks as the app sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    # the text the router matches against what each replica has cached (`routing_text_of`)
    routing_text: str | None = None


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str  # which replica answers: the ingress returns it as x-gptserve-replica


def routing_text_of(path: str, body: bytes) -> str | None:
    """What a generation request's prompt starts with, as text: the prompt of a completion (token
    ids as their decimal text), a chat's messages role by role. None for anything else, or a
    body that is not what the route expects (the replica answers that with its 400)."""
    if path not in GENERATION_PATHS or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if path == "/v1/completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts goes where its first one is cached
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):
            return " ".join(str(t) for t in prompt)
        return None
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if isinstance(m, dict):
            content = m.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role')}\n{content if isinstance(content, str) else ''}\n")
    return "".join(parts)


async def play(app, request: ForwardedRequest, replica: str) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through the ASGI `app` and yield its reply. Closing the generator early
    (the client went away) is a disconnect to the app, which cancels the generation."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": None,
        "state": {},
    }
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    finished = False
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])), replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        finished = True
    finally:
        gone.set()  # what a server tells an app whose client left; the app cancels its requests
        if finished:
            with contextlib.suppress(Exception):  # the app has answered (a 500 for its own errors)
                await task
        elif not task.done():
            task.cancel()
