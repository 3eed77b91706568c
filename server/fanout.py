"""One request, many engine requests: a request with P prompts and `n` choices becomes P * n
engine requests, choice index `prompt_index * n + i` (OpenAI's order).

- `submit_all` queues every choice, or none (a failure cancels the ones already queued);
- `merged` yields (choice index, `gpt.Piece`) from all of them as the pieces arrive;
- `collect` runs them to the end, each choice's pieces merged into one, and cancels them all
  if the client goes away meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from fastapi import Request

from gpt import Piece, RequestError

from .errors import APIError, engine_closed, from_request_error, invalid
from .params import Job
from .requests import EngineClosed, QueueFull

# OpenAI knows "stop" and "length". A request cut short by --timeout or by shutdown did not
# reach a stop either, so it reports "length": the output ended at a limit, not naturally.
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI's; "error" (the engine failed) is a 500."""
    if reason == "error":
        raise APIError(500, "generation failed inside the engine (see the server log)")
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def submit_all(engine, jobs: Sequence[Job], timeout: float | None) -> list:
    """Submit every job, or none: on a failure the ones already queued are cancelled. (A
    request with more choices than the queue holds was refused earlier: params.check_fanout.)
    One handle per choice, in order."""
    handles = []
    try:
        for job in jobs:
            if job.params.num_beams > 1:
                handles += engine.submit_beams(job.ids, job.params, job.n, timeout=timeout)
            else:
                handles.append(engine.submit(job.ids, job.params, timeout=timeout))
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, QueueFull):
            raise APIError(
                429, f"the server is busy: {e}; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if isinstance(e, EngineClosed):
            raise engine_closed(e) from None
        if isinstance(e, RequestError):
            raise from_request_error(e) from None
        if isinstance(e, ValueError):
            raise invalid(str(e)) from None
        raise
    return handles


def cancel_unfinished(handles) -> None:
    for h in handles:
        if not h.finished:
            h.cancel()


async def merged(handles) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, Piece) from all handles as they arrive, until every one has finished.
    Closing the iterator early cancels the unfinished requests."""
    if len(handles) == 1:  # the common case: no task per piece to race against other choices
        try:
            async for piece in handles[0]:
                yield 0, piece
        finally:
            cancel_unfinished(handles)
        return
    pending: dict[asyncio.Future, int] = {}
    try:
        for i, h in enumerate(handles):
            pending[asyncio.ensure_future(h.__anext__())] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.get):
                i = pending.pop(fut)
                piece = fut.result()
                if piece.finish_reason is None:
                    pending[asyncio.ensure_future(handles[i].__anext__())] = i
                yield i, piece
    finally:
        for fut in pending:
            fut.cancel()
        cancel_unfinished(handles)


async def collect(request: Request, handles) -> list[Piece]:
    """Run every choice to the end: one merged Piece per choice. If the client goes away
    meanwhile, the requests are cancelled (freeing their slots) instead of running on for nobody."""
    choices = [Piece() for _ in handles]

    async def consume():
        async for i, piece in merged(handles):
            choices[i] = choices[i].merge(piece)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                raise APIError(499, "the client disconnected", code="client_closed_request")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        cancel_unfinished(handles)
    for c in choices:
        finish_reason(c.finish_reason)
    return choices
