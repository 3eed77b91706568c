"""The continuous-batching generation engine: an asyncio front over a model-running thread.

    engine = Engine(model, tokenizer, max_batch_size=32)
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64))   # inside an event loop
    async for piece in handle:
        print(piece.text, end="")

A background thread runs the step loop (`server/scheduler.py`): every step it admits waiting
requests into free KV-cache rows ("slots"), prefills prompts in chunks under a token budget and
decodes one token for every running request in one batched forward. Torch releases the GIL inside
its kernels, so the event loop keeps streaming while the thread computes. Outputs cross back to
the event loop once per step per loop, through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from gpt import ContextLimits, Piece, RequestError, SamplingParams
from gpt.speculative import SpeculativeConfig

from .beams import BeamJob
from .metrics import Metrics
from .model_prep import prepare_model
from .requests import EngineClosed, QueueFull, Request, RequestHandle, deliver
from .scheduler import Scheduler

__all__ = ["Engine", "EngineStats", "RequestHandle", "Piece", "QueueFull", "EngineClosed"]

log = logging.getLogger("gpt-serve.engine")


def _on_thread(fn, threads: int | None) -> None:
    """Run `fn` on a new thread with `threads` torch threads (None: a new thread's default),
    as the engine thread runs; re-raise what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if threads:
                torch.set_num_threads(threads)
            fn()
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run, name="gpt-serve-prepare")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (what /ready, the metrics and tests look at)."""

    slots: int  # KV-cache rows: requests decoded together at most
    slots_in_use: int
    running: int  # requests holding a slot (prefilling or decoding)
    waiting: int  # requests queued for a slot
    max_queue: int
    draining: bool  # shutting down: new requests are refused


class Engine:
    """Serves one model to many concurrent requests.

    The engine takes the model over: it is put in eval mode and prepared to serve
    (`server/model_prep.py`: packed weights unless `pack_weights=False`, `compile_decode`,
    `cuda_graphs`). The model should not be trained while an engine serves it.

    max_len: tokens per KV-cache row (a GPT's prompt plus output; an encoder-decoder's output,
    start token included; its source always gets the full block). Default: the block size.
    max_prompt_tokens: refuse longer prompts (default: whatever fits).
    pack_weights, compile_decode, cuda_graphs: see `server.model_prep.prepare_model`.
    speculative: speculative decoding's mode ("auto", "ngram", "off") or config
    (gpt.speculative); it never changes the output.
    kv_cache_dtype: the KV cache's dtype (default: the model's; see `gpt.GPT.new_cache`).
    prefix_cache: keep finished requests' keys and values in their rows and start new requests
    from the longest cached prompt prefix (see server/prefix_cache.py); a GPT only.
    threads: CPU threads for the engine thread's kernels (None: torch's default for a new
    thread). OpenMP keeps one thread team per calling thread; see server/cli.py for why the
    process should run its multi-threaded kernels on this one thread only.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 128,
        max_len: int | None = None,
        max_prompt_tokens: int | None = None,
        prefill_chunk: int = 512,
        metrics: Metrics | None = None,
        threads: int | None = None,
        pack_weights: bool = True,
        prefix_cache: bool = True,
        compile_decode: bool = False,
        cuda_graphs: bool = True,
        kv_cache_dtype=None,
        speculative: SpeculativeConfig | str | None = "auto",
    ):
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.threads = threads
        self.metrics = metrics if metrics is not None else Metrics()
        self.limits = ContextLimits.of(model, tokenizer, max_len=max_len, max_prompt_tokens=max_prompt_tokens)
        self._sched = Scheduler(
            model,
            tokenizer,
            max_batch_size,
            self.limits.max_len,
            prefill_chunk,
            self.metrics,
            deliver,
            prefix_cache=prefix_cache,
            cache_dtype=kv_cache_dtype,
            speculative=SpeculativeConfig.of(speculative),
        )
        # On a thread set up as the engine thread will be: dynamo guards its compiled graphs on
        # the calling thread's torch thread count, and a graph compiled on the single-threaded
        # main thread was compiled again (seconds) in the middle of serving.
        _on_thread(
            lambda: prepare_model(
                model,
                self._sched.cache,
                max_batch_size=max_batch_size,
                pack_weights=pack_weights,
                compile_decode=compile_decode,
                cuda_graphs=cuda_graphs,
            ),
            threads,
        )
        self._waiting: collections.deque[Request] = collections.deque()
        self._beams: collections.deque[BeamJob] = collections.deque()  # the first one runs
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stop = False
        self._admitting: list[Request] = []
        self.dead: str | None = None  # why the engine thread died; it serves nothing after that
        self.on_death = None  # called (from the engine thread) with that reason, e.g. to exit the process

    # --- the asyncio side ---------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpt-serve-engine", daemon=True)
                self._thread.start()

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request (starting the engine if need be). Raises gpt.RequestError (a
        ValueError: bad prompt or params, or more than fits in the context; see
        `self.limits`), QueueFull or EngineClosed.

        params.prompt_logprobs: also score the prompt, each token given the ones before it; the
        request's first piece carries them (`Piece.prompt_logprobs`). params.max_new_tokens 0:
        read (and score) the prompt, generate nothing: the request ends with finish reason
        "length" and no tokens."""
        if isinstance(params, SamplingParams) and params.num_beams > 1:
            raise RequestError.of("num_beams", "beam search (num_beams > 1) goes through submit_beams")
        (handle,) = self._queue(prompt_ids, params, 1, timeout, request_id)
        return handle

    def submit_beams(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[RequestHandle]:
        """Queue a beam search (params.num_beams > 1; see server/beams.py): one handle per choice,
        the i-th receiving the i-th best beam as a single piece when the search ends. It counts
        as one request against the queue. Raises like `submit`."""
        if not isinstance(params, SamplingParams) or params.num_beams < 2:
            raise TypeError("submit_beams takes SamplingParams with num_beams > 1")
        if not 1 <= n <= params.num_beams:
            k = params.num_beams
            raise RequestError.of(
                "n",
                f"must be in [1, num_beams = {k}], got {n}: the choices are the best beams",
                "invalid_combination",
            )
        return self._queue(prompt_ids, params, n, timeout, request_id)

    def _queue(self, prompt_ids, params, n, timeout, request_id) -> list[RequestHandle]:
        """What submit and submit_beams share: check, make `n` requests and their handles, queue."""
        loop = asyncio.get_running_loop()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        prompt, budget = self.limits.check(prompt_ids, params)
        now = time.monotonic()
        rid = request_id or uuid.uuid4().hex
        reqs = [
            Request(
                id=f"{rid}-{i}" if n > 1 else rid,
                prompt=prompt,
                params=params,
                max_new_tokens=budget,
                loop=loop,
                arrival=now,
                deadline=None if timeout is None else now + timeout,
            )
            for i in range(n)
        ]
        handles = [RequestHandle(r, self._wake) for r in reqs]
        with self._cond:
            self._check_open()
            if params.num_beams > 1:
                self._beams.append(BeamJob(self.model, self.tokenizer, reqs))
            else:
                self._waiting.extend(reqs)
                self._queue_changed()
            self._cond.notify()
        self.start()
        return handles

    def _check_open(self) -> None:
        """Raise unless a new request may queue (called under the lock)."""
        closed = self.closed()
        if closed is not None:
            raise closed
        if len(self._waiting) + len(self._beams) >= self.max_queue:
            raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")

    async def shutdown(self, grace: float = 30.0) -> None:
        """Take no new requests; let queued and running ones finish for up to `grace` seconds;
        cancel what is left; stop the thread."""
        with self._cond:
            self._draining = True
            self._cond.notify()
        deadline = time.monotonic() + max(grace, 0.0)
        busy = lambda: self._waiting or self._admitting or self._sched.running or self._beams  # noqa: E731
        while busy() and time.monotonic() < deadline and self._alive():
            await asyncio.sleep(0.02)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def stats(self) -> EngineStats:
        return EngineStats(
            slots=self.max_batch_size,
            slots_in_use=self._sched.slots_in_use,
            running=len(self._sched.running),
            waiting=len(self._waiting) + len(self._beams),
            max_queue=self.max_queue,
            draining=self.draining,
        )

    def closed(self) -> EngineClosed | None:
        """Why the engine takes no new requests (dead first: that outlasts a restart's drain),
        or None while it takes them."""
        if self.dead is not None:
            return EngineClosed.dead(self.dead)
        if self._draining or self._stop:
            return EngineClosed.shutting_down()
        return None

    @property
    def draining(self) -> bool:
        return self._draining or self._stop or self.dead is not None

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the step loop itself broke: nothing more can be served
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, reason: str) -> None:
        """The engine thread cannot go on: every request still waiting or running ends with
        "error" (none hangs), new ones are refused, and `on_death` lets the process exit so
        that a supervisor restarts it."""
        log.critical("the engine thread died (%s); every request fails from now on", reason)
        with self._cond:
            self.dead = reason
            beams = [r for job in self._beams for r in job.requests]
            left = list(
                {id(r): r for r in [*self._waiting, *self._admitting, *self._sched.running, *beams]}.values()
            )
            self._waiting.clear()
            self._queue_changed()
            self._beams.clear()
        self._sched.running.clear()
        self._sched.set_gauges()
        deliver([(r, Piece(finish_reason="error")) for r in left])
        if self.on_death is not None:
            self.on_death(reason)

    def _serve(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stop or self._waiting or self._sched.running or self._beams):
                        self._cond.wait()
                    if self._stop:
                        break
                    admit, gone = self._take_from_queue()
                    self._admitting = admit  # out of the queue, not yet running: _die must see them
                    beam = self._beams[0] if self._beams else None
                if admit or gone or self._sched.running:
                    try:
                        self._sched.step(admit=admit, gone=gone)
                    except Exception:  # a failed forward must not kill the server: fail the batch instead
                        log.exception("engine step failed; failing the running requests")
                        self._sched.fail_all()
                    self._admitting = []  # running (or finished) now
                if beam is not None:
                    self._advance_beam(beam)
            self._cancel_everything()

    def _advance_beam(self, job: BeamJob) -> None:
        outs = job.step(time.monotonic())
        if outs is not None:
            with self._cond:
                self._beams.remove(job)
            deliver(outs)

    def _take_from_queue(self) -> tuple[list[Request], list[Request]]:
        """(requests to admit into free slots, oldest first; cancelled or timed-out requests
        leaving the queue). Called under the lock."""
        now = time.monotonic()
        gone = [r for r in self._waiting if r.cancelled or r.expired(now)]
        for r in gone:
            self._waiting.remove(r)
        admit = []
        while self._waiting and len(admit) < self._sched.free_slots:
            admit.append(self._waiting.popleft())
        self._queue_changed()
        return admit, gone

    def _queue_changed(self) -> None:
        """The waiting gauge; the running and KV-slot gauges are the scheduler's (set_gauges)."""
        self.metrics.requests_waiting.set(len(self._waiting))

    def _cancel_everything(self) -> None:
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
            beams = list(self._beams)
            self._beams.clear()
        for job in beams:
            deliver(job.end("cancelled"))
        for r in left:
            r.cancelled = True
        self._sched.step(admit=[], gone=left, cancel_all=True)
        with self._cond:
            self._queue_changed()
        self._sched.set_gauges()
