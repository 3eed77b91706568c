"""One engine step at a time: slots, chunked prefill, batched decode, sampling and finishing.

Everything here runs on the engine thread only; `server/engine.py` is the thread-safe front.

A request holds one row ("slot") of a preallocated KV cache from admission to its last token.
Each step:
  1. drop cancelled and timed-out requests (their slots free up at once);
  2. admit new requests into free slots;
  3. decode: one (B, 1) forward over every request that has a token to feed, then sample;
  4. prefill: prompt chunks of the admitted requests, at most `prefill_chunk` (padded) tokens in
     one forward, so a long prompt costs the running streams one chunk of delay per step instead
     of freezing them. A request whose prompt is complete samples its first token here and joins
     the decode batch on the next step.
Decode and prefill are separate forwards on purpose: padding 1-token decode rows to a chunk's
width would multiply the decode rows' cost in every linear layer by the chunk length.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from gpt import SamplingParams, TextStream
from gpt.sampling import RowState, sample, token_logprobs

from .metrics import Metrics


@dataclass
class Output:
    """One streamed piece of one request."""
    text: str  # safe to show: stop strings are never leaked and UTF-8 characters never split
    token_ids: list[int] = field(default_factory=list)  # tokens consumed by this piece
    logprobs: list[float] = field(default_factory=list)  # chosen-token logprobs, one per token id
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # when params.logprobs > 0
    finish_reason: Optional[str] = None  # None until the last piece: stop|length|timeout|cancelled|error
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, this piece included

    def merge(self, later: "Output") -> "Output":
        """This piece followed by a later one of the same request, as one piece."""
        return Output(self.text + later.text, self.token_ids + later.token_ids, self.logprobs + later.logprobs,
                      self.top_logprobs + later.top_logprobs, later.finish_reason, later.prompt_tokens,
                      later.completion_tokens)


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    loop: Any  # the asyncio loop the request's handle lives on
    arrival: float  # time.monotonic() at submit
    deadline: Optional[float] = None
    handle: Any = None
    cancelled: bool = False  # set from any thread by RequestHandle.cancel
    # engine-thread state from admission on
    slot: int = -1
    state: Optional[RowState] = None
    stream: Optional[TextStream] = None
    prefilled: int = 0  # prompt tokens already in the cache
    next_token: int = -1  # the sampled token to feed next; -1 while the prompt is prefilling
    first_token_at: Optional[float] = None
    last_token_at: float = 0.0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def completion_tokens(self) -> int:
        return len(self.state.output_ids) if self.state else 0


Deliver = Callable[[list[tuple[Request, Output]]], None]


class Scheduler:
    def __init__(self, model, tokenizer, max_batch_size: int, max_len: int, prefill_chunk: int,
                 metrics: Metrics, deliver: Deliver):
        self.model, self.tokenizer, self.metrics, self.deliver = model, tokenizer, metrics, deliver
        self.seq2seq = model.config.arch == "seq2seq"
        self.prefill_chunk = prefill_chunk
        self.eot = tokenizer.eot_token
        src = model.config.block_size if self.seq2seq else None
        self.cache = model.new_cache(max_batch_size, max_len=max_len, src_len=src)
        self.batch = max_batch_size
        self._free = list(range(max_batch_size))  # a heap: new requests take the lowest free row
        self.running: list[Request] = []  # holding slots, in admission order

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def slots_in_use(self) -> int:
        return self.batch - len(self._free)

    # --- the step ----------------------------------------------------------------------

    def step(self, arrivals: list[Request], gone: list[Request], cancel_all: bool = False) -> None:
        now = time.monotonic()
        outs: list[tuple[Request, Output]] = []
        try:
            for r in gone:  # left the queue before getting a slot
                self._finish(r, "cancelled" if r.cancelled or not r.expired(now) else "timeout", outs, now)
            for r in list(self.running):
                if r.cancelled or cancel_all:
                    self._finish(r, "cancelled", outs, now)
                elif r.expired(now):
                    self._finish(r, "timeout", outs, now, flush=True)
            for r in arrivals:
                self._admit(r, now)
            self._decode(outs)
        finally:  # running streams get their token before the prefill chunk runs; and on an
            self._deliver(outs)  # exception, requests already finished are still told so
        outs = []
        try:
            if self.seq2seq:
                self._start_sources(outs)
            else:
                self._prefill(outs)
        finally:
            self._deliver(outs)

    def _deliver(self, outs: list[tuple[Request, Output]]) -> None:
        if outs:
            self.deliver(outs)

    def fail_all(self) -> None:
        """After an exception inside a step: end every running request with finish_reason "error"."""
        outs: list[tuple[Request, Output]] = []
        now = time.monotonic()
        for r in list(self.running):
            self._finish(r, "error", outs, now)
        self._deliver(outs)

    # --- phases ------------------------------------------------------------------------

    def _admit(self, r: Request, now: float) -> None:
        r.slot = heapq.heappop(self._free)
        self.cache.reset(slice(r.slot, r.slot + 1))
        r.state = RowState.new(r.params, r.prompt)
        r.stream = TextStream(self.tokenizer, r.params.stop)
        self.running.append(r)
        self._set_gauges()
        self.metrics.queue_wait_seconds.observe(now - r.arrival)
        self.metrics.prompt_tokens_total.inc(len(r.prompt))

    def _decode(self, outs) -> None:
        reqs = [r for r in self.running if r.next_token >= 0]
        if not reqs:
            return
        self._compact(reqs)  # now in rows 0..n-1: the cache reads them as views, not copies
        reqs.sort(key=lambda r: r.slot)
        tokens = torch.tensor([r.next_token for r in reqs], dtype=torch.long, device=self.model.device)[:, None]
        logits = self.model.step(tokens, self.cache, rows=slice(0, len(reqs)))
        self.metrics.batch_size.observe(len(reqs))
        self._emit(reqs, logits, outs)

    def _compact(self, decoding: list[Request]) -> None:
        """Move decoding rows into cache rows 0..d-1. Attention reads a contiguous range of rows
        as views; any other set of rows is gathered, a copy of every layer's keys and values at
        every step (at batch 32 and 160 tokens that doubles a GPT-2-small decode step). A row
        moves once, when a request below it finishes, and costs one copy of that row."""
        d = len(decoding)
        misplaced = [r for r in decoding if r.slot >= d]
        if not misplaced:
            return
        holder = {r.slot: r for r in self.running}
        targets = [s for s in range(d) if s not in holder or holder[s].next_token < 0]
        src, dst = [], []
        for r, t in zip(misplaced, targets):
            other = holder.get(t)  # a request still prefilling swaps places; a free row just moves
            src.append(r.slot), dst.append(t)
            if other is not None:
                src.append(t), dst.append(r.slot)
                other.slot = r.slot
            else:
                self._free.remove(t)
                self._free.append(r.slot)
            r.slot = t
        heapq.heapify(self._free)
        self.cache.reorder(torch.tensor(src), torch.tensor(dst))

    def _prefill(self, outs) -> None:
        """One forward over prompt chunks of the prefilling requests (oldest first), padded
        (rows x widest chunk) to at most `prefill_chunk` tokens."""
        budget = self.prefill_chunk
        picked: list[tuple[Request, int]] = []
        width = 0
        for r in self.running:
            if r.next_token >= 0:
                continue
            n = min(len(r.prompt) - r.prefilled, budget)
            if picked and (len(picked) + 1) * max(width, n) > budget:
                break
            picked.append((r, n))
            width = max(width, n)
        if not picked:
            return
        ids = torch.zeros(len(picked), width, dtype=torch.long)
        for i, (r, n) in enumerate(picked):
            ids[i, :n] = torch.tensor(r.prompt[r.prefilled: r.prefilled + n])
        rows = torch.tensor([r.slot for r, _ in picked])
        n_tokens = torch.tensor([n for _, n in picked])
        logits = self.model.step(ids.to(self.model.device), self.cache, rows=rows, n_tokens=n_tokens)
        done = []
        for i, (r, n) in enumerate(picked):
            r.prefilled += n
            if r.prefilled == len(r.prompt):
                done.append(i)
        if done:
            self._emit([picked[i][0] for i in done], logits[done], outs)

    def _start_sources(self, outs) -> None:
        """Encoder-decoder: encode whole sources (no chunking: the encoder is not causal) of
        new requests, up to `prefill_chunk` source tokens per step (always at least one)."""
        picked, total = [], 0
        for r in self.running:
            if r.next_token >= 0:
                continue
            if picked and total + len(r.prompt) > self.prefill_chunk:
                break
            picked.append(r)
            total += len(r.prompt)
        if not picked:
            return
        rows = torch.tensor([r.slot for r in picked])
        logits = self.model.start([r.prompt for r in picked], self.cache, rows=rows, bos_token_id=self.eot)
        for r in picked:
            r.prefilled = len(r.prompt)
        self._emit(picked, logits, outs)

    # --- sampling and finishing --------------------------------------------------------

    def _emit(self, reqs: list[Request], logits: torch.Tensor, outs) -> None:
        """Sample one token for each request from its logits row and turn it into an Output."""
        now = time.monotonic()
        m = self.metrics
        tokens = sample(logits, [r.state for r in reqs])
        # The chosen-token logprob costs one log_softmax over (B, vocab): under 1% of a decode
        # step even at batch 32, so every Output carries it (the API may need it at top_n = 0).
        top_n = max(r.params.logprobs for r in reqs)
        chosen, top_v, top_i = token_logprobs(logits, tokens, top_n)
        toks, lps = tokens.tolist(), chosen.tolist()
        if top_n:
            top_v, top_i = top_v.tolist(), top_i.tolist()
        m.generation_tokens_total.inc(len(reqs))
        for j, r in enumerate(reqs):
            tok = toks[j]
            r.state.output_ids.append(tok)
            if r.first_token_at is None:
                r.first_token_at = now
                m.time_to_first_token_seconds.observe(now - r.arrival)
            else:
                m.inter_token_latency_seconds.observe(now - r.last_token_at)
            r.last_token_at = now
            out = Output("", [tok], [lps[j]], prompt_tokens=len(r.prompt), completion_tokens=len(r.state.output_ids))
            if r.params.logprobs:
                k = r.params.logprobs
                out.top_logprobs.append(dict(zip(top_i[j][:k], top_v[j][:k])))
            reason = None
            if tok == self.eot and not r.params.ignore_eos:
                out.text, reason = r.stream.flush(), "stop"
            else:
                out.text, stopped = r.stream.push(tok)
                if stopped:
                    reason = "stop"
                elif len(r.state.output_ids) >= r.params.max_new_tokens:
                    out.text += r.stream.flush()
                    reason = "stop" if r.stream.stopped else "length"
            outs.append((r, out))
            if reason is None:
                r.next_token = tok
            else:
                out.finish_reason = reason
                self._release(r, reason, now)

    def _finish(self, r: Request, reason: str, outs, now: float, flush: bool = False) -> None:
        """End a request outside of sampling (cancel, timeout, error) with an empty-token piece."""
        text = r.stream.flush() if flush and r.stream is not None else ""
        outs.append((r, Output(text, finish_reason=reason, prompt_tokens=len(r.prompt),
                               completion_tokens=r.completion_tokens)))
        self._release(r, reason, now)

    def _release(self, r: Request, reason: str, now: float) -> None:
        if r.slot >= 0:
            heapq.heappush(self._free, r.slot)
            r.slot = -1
            self.running.remove(r)
            self._set_gauges()  # before the request's last Output is delivered
        self.metrics.request_finished_total.labels(finish_reason=reason).inc()
        self.metrics.e2e_request_latency_seconds.observe(now - r.arrival)

    def _set_gauges(self) -> None:
        self.metrics.requests_running.set(len(self.running))
        self.metrics.kv_slots_used.set(self.slots_in_use)
