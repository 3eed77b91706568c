"""What the engine queues and what a caller holds: one `Request` per generation, the
`RequestHandle` that streams its pieces back to the caller's event loop, and the engine's two
refusals (`QueueFull`, `EngineClosed`).

A `Request` is created on the event loop by `Engine.submit` and from then on changed only on
the engine thread (`server/scheduler.py`, `server/beams.py`), except for `cancelled`, which any
thread may set. Its pieces cross back through `RequestHandle._put`, on the handle's own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gpt import Piece, SamplingParams, SequenceDecoder
from gpt.decoding import PromptLogprobs
from gpt.speculative import Drafter


class QueueFull(Exception):
    """The waiting queue is at capacity (HTTP 429 with Retry-After)."""


class EngineClosed(Exception):
    """The engine takes no new requests (HTTP 503): it has died (`code` "engine_dead") or is
    shutting down ("shutting_down"). The one place that words either: `dead`, `shutting_down`."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code

    @classmethod
    def dead(cls, reason: str) -> EngineClosed:
        return cls(f"the engine has stopped ({reason}); the server must be restarted", "engine_dead")

    @classmethod
    def shutting_down(cls) -> EngineClosed:
        return cls("the server is shutting down and takes no new requests", "shutting_down")


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int  # the budget, checked against the context at submit; 0: only read the prompt
    loop: Any  # the asyncio loop the request's handle lives on
    arrival: float  # time.monotonic() at submit
    deadline: float | None = None
    handle: Any = None
    cancelled: bool = False  # set from any thread by RequestHandle.cancel
    # engine-thread state from admission on
    slot: int = -1
    decoder: SequenceDecoder | None = None
    drafter: Drafter | None = None  # its draft sources, where the engine speculates (gpt.speculative)
    prefilled: int = 0  # prompt tokens already in the cache
    cached_tokens: int = 0  # of those, tokens whose keys and values came from the prefix cache
    share_from: Request | None = None  # until it has prefilled share_len tokens, wait, then copy them
    share_len: int = 0
    scored: PromptLogprobs | None = None  # the prompt's logprobs so far, when asked
    first_token_at: float | None = None
    last_token_at: float = 0.0

    @property
    def prompt_logprobs(self) -> int | None:
        """Report the prompt's logprobs with this many alternatives; None: not."""
        return self.params.prompt_logprobs

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def decoding(self) -> bool:
        """Has a sampled token to feed: its prompt is in the cache and it has not finished."""
        return self.decoder is not None and bool(self.decoder.output_ids) and not self.decoder.finished


Deliver = Callable[[list[tuple[Request, Piece]]], None]


class RequestHandle:
    """What `Engine.submit` returns: iterate it for `gpt.Piece`s; `cancel()` from anywhere.
    `wake` tells the engine thread to look at the request again (it frees a cancelled slot)."""

    def __init__(self, request: Request, wake: Callable[[], None]):
        self._request, self._wake = request, wake
        self.request_id, self.prompt_tokens = request.id, len(request.prompt)
        self._queue: asyncio.Queue[Piece] = asyncio.Queue()
        self._done = False
        request.handle = self

    def __aiter__(self) -> AsyncIterator[Piece]:
        return self

    async def __anext__(self) -> Piece:
        if self._done:
            raise StopAsyncIteration
        out = await self._queue.get()
        # A consumer that fell behind gets everything pending as one piece: fewer, larger SSE
        # chunks instead of a growing backlog.
        while out.finish_reason is None and not self._queue.empty():
            out = out.merge(self._queue.get_nowait())
        if out.finish_reason is not None:
            self._done = True
        return out

    def cancel(self) -> None:
        """Drop the request (e.g. its client disconnected): its slot is freed within one step."""
        self._request.cancelled = True
        self._wake()

    @property
    def finished(self) -> bool:
        return self._done

    def _put(self, out: Piece) -> None:  # on the event loop's thread
        self._queue.put_nowait(out)


def deliver(outputs: list[tuple[Request, Piece]]) -> None:
    """Hand outputs (from the engine thread) to their event loops: one thread-safe callback per
    loop. A closed loop has nobody listening any more: its requests are cancelled."""
    by_loop: dict = {}
    for req, out in outputs:
        by_loop.setdefault(req.loop, []).append((req.handle, out))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed
            for handle, _ in items:
                handle._request.cancelled = True


def _put_all(items: list[tuple[RequestHandle, Piece]]) -> None:
    for handle, out in items:
        handle._put(out)
