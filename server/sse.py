"""Server-sent events: OpenAI's streaming envelope, shared by both generation endpoints, and
the response that carries it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from gpt import Piece

from .api_responses import Usage
from .errors import APIError
from .fanout import cancel_unfinished, finish_reason, merged

# Characters JSON leaves as they are but that many clients' line readers (httpx's, Python's
# str.splitlines) take for line ends: a generated U+2028 split an event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


def sse_error(exc: APIError) -> str:
    return sse(exc.body())


async def event_stream(
    handles,
    *,
    object_name: str,
    rid: str,
    created: int,
    model_name: str,
    prompt_tokens: int,
    include_usage: bool,
    choice_delta,
    opening=(),
    n: int = 1,
):
    """A chunk per piece of a choice (`choice_delta(i, piece, finish_reason)` gives the choice
    dict, a list of them for one chunk each, or None to skip the piece), with `include_usage` a
    last chunk with `choices: []` and the usage, then `[DONE]`. An engine error mid-stream becomes
    an error event. Choices come `n` per prompt (see `Usage.of_choices`)."""
    last = [Piece() for _ in handles]  # each choice's latest piece: its token counts so far
    pieces = merged(handles)

    def chunk(choices: list, usage=None) -> dict:
        d = {"id": rid, "object": object_name, "created": created, "model": model_name, "choices": choices}
        if include_usage:
            d["usage"] = usage  # null on every chunk but the last, as OpenAI does
        return d

    try:
        for choice in opening:
            yield sse(chunk([choice]))
        async for i, piece in pieces:
            last[i] = piece
            choice = choice_delta(i, piece, finish_reason(piece.finish_reason))
            for c in choice if isinstance(choice, list) else [] if choice is None else [choice]:
                yield sse(chunk([c]))
        if include_usage:
            usage = Usage.of_choices(prompt_tokens, last, n)
            yield sse(chunk([], usage.model_dump()))
    except APIError as e:
        yield sse_error(e)
    finally:
        await pieces.aclose()
    yield sse("[DONE]")


class EventStream(StreamingResponse):
    """An SSE response that, however it ends, closes its generator and cancels the engine
    requests it streams: the moment the client is gone, even before the first byte was sent (a
    generator that never started runs no cleanup of its own), not when it is garbage-collected."""

    def __init__(self, gen: AsyncIterator[str], handles=()):
        super().__init__(
            gen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._gen, self._handles = gen, handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel_unfinished(self._handles)
            await self._gen.aclose()
