"""One engine step at a time: slots, chunked prefill, batched decode and finishing.

Everything here runs on the engine thread only; `server/engine.py` is the thread-safe front.
What a sampled token becomes (text, stop strings, budget, finish reason) is decided by each
request's `gpt.SequenceDecoder`, exactly as in the library: this module only batches forwards.

A request holds one row ("slot") of a preallocated KV cache from admission to its last token.
Each step:
  1. drop cancelled and timed-out requests (their slots free up at once);
  2. admit new requests into free slots;
  3. decode: one (B, 1) forward over every request that has a token to feed, then sample;
  4. prefill: prompts of the admitted requests, at most `prefill_chunk` (padded) tokens in one
     forward, so a long prompt costs the running streams one chunk of delay per step instead
     of freezing them. A request whose prompt is complete samples its first token here and joins
     the decode batch on the next step.
Decode and prefill are separate forwards on purpose: padding 1-token decode rows to a chunk's
width would multiply the decode rows' cost in every linear layer by the chunk length.

Prefix caching (a GPT's prompts): a request may start from a row that already holds its
prompt's beginning, or copy that beginning from a row in use; `server/prefix_cache.py` keeps the
rows' contents and decides where each request goes.

Prompt logprobs (a completion's `echo` with `logprobs`): a request that asks for them prefills its
whole prompt, without reusing a cached prefix, and each prefill forward that carries such a
request returns logits at every position instead of each row's last; its rows' logits give the
logprob of each next prompt token and the top alternatives (`gpt.decoding.PromptLogprobs.score`,
from the same distribution as generated tokens' logprobs).
They travel on the request's first piece. A request with a budget of 0 new tokens ends once its
prompt is scored (with nothing to score, at admission, without taking a slot).
"""

from __future__ import annotations

import logging
import time

import torch

from gpt import Piece, SequenceDecoder, decode_tokens
from gpt.decoding import PromptLogprobs
from gpt.speculative import SpeculativeConfig, decode_step, speculator_for

from .metrics import Metrics
from .prefix_cache import PrefixIndex
from .requests import Deliver, Request

log = logging.getLogger("gpt-serve.scheduler")


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int,
        max_len: int,
        prefill_chunk: int,
        metrics: Metrics,
        deliver: Deliver,
        prefix_cache: bool = True,
        cache_dtype: torch.dtype | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        self.model, self.tokenizer, self.metrics, self.deliver = model, tokenizer, metrics, deliver
        self.spec = speculator_for(model, speculative, max_batch_size, max_len, tokenizer.vocab_size)
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache(max_batch_size, max_len=max_len, dtype=cache_dtype)
        self.batch = max_batch_size
        self._free = set(range(max_batch_size))
        self.running: list[Request] = []  # holding slots, in admission order
        # The encoder-decoder's prompt is its source, encoded whole at every admission: nothing to reuse.
        use = prefix_cache and model.prefills_in_chunks
        self.prefix = PrefixIndex(max_batch_size, max_len) if use else None

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def slots_in_use(self) -> int:
        return self.batch - len(self._free)

    # --- the step ----------------------------------------------------------------------

    def step(self, *, admit: list[Request], gone: list[Request], cancel_all: bool = False) -> None:
        """One step: end `gone` requests (they left the queue before getting a slot), end
        cancelled and expired running ones (all of them with `cancel_all`), give `admit`
        requests slots, decode one token for the decoding requests, then prefill."""
        now = time.monotonic()
        outs: list[tuple[Request, Piece]] = []
        try:
            for r in gone:
                self._finish(r, "cancelled" if r.cancelled or not r.expired(now) else "timeout", outs, now)
            for r in list(self.running):
                if r.cancelled or cancel_all:
                    self._finish(r, "cancelled", outs, now)
                elif r.expired(now):
                    self._finish(r, "timeout", outs, now, flush=True)
            for r in admit:
                self._admit_or_fail(r, now, outs)
            self._decode(outs)
        finally:  # running streams get their token before the prefill chunk runs; and on an
            self._deliver(outs)  # exception, requests already finished are still told so
        outs = []
        try:
            self._prefill(outs)
        finally:
            self._deliver(outs)

    def _deliver(self, outs: list[tuple[Request, Piece]]) -> None:
        if outs:
            self.deliver(outs)

    def fail_all(self) -> None:
        """After an exception inside a step: end every running request with finish_reason "error"."""
        outs: list[tuple[Request, Piece]] = []
        now = time.monotonic()
        for r in list(self.running):
            self._finish(r, "error", outs, now)
        self._deliver(outs)

    # --- phases ------------------------------------------------------------------------

    def _admit(self, r: Request, now: float) -> None:
        r.decoder = SequenceDecoder(self.tokenizer, r.prompt, r.params, r.max_new_tokens)  # may raise: first
        r.drafter = self.spec.drafter(r.decoder) if self.spec is not None else None
        row, reuse = self._place(r)
        self._free.remove(row)
        r.slot = row
        self.cache.reset(slice(row, row + 1))
        if reuse:
            self.cache.lengths[row] = reuse  # keep the shared prefix, drop the rest of the row
            r.prefilled = reuse
            self._reused(r, reuse)
        if self.prefix is not None:
            self.prefix.claim(row, r.prompt)
        self.running.append(r)
        self.set_gauges()
        self.metrics.queue_wait_seconds.observe(now - r.arrival)
        self.metrics.prompt_tokens_total.inc(len(r.prompt))

    def _admit_or_fail(self, r: Request, now: float, outs) -> None:
        """Admit `r`; if that fails (a bug, or a request the checks at submit missed), only `r`
        ends, with finish reason "error", and whatever slot it took is free again."""
        if r.max_new_tokens == 0 and r.prompt_logprobs is None:  # nothing to compute: done, without a slot
            self._finish(r, "length", outs, now)
            return
        try:
            self._admit(r, now)
        except Exception:
            log.exception("admitting request %s failed; ending it", r.id)
            if r.slot >= 0 and r not in self.running:  # a row taken but not yet registered
                if self.prefix is not None:
                    self.prefix.forget(r.slot)
                self._free.add(r.slot)
                r.slot = -1
            r.share_from = None
            self._finish(r, "error", outs, now)

    def _place(self, r: Request) -> tuple[int, int]:
        """The free row `r` takes and how many of its prompt tokens that row already holds."""
        if self.prefix is None:
            return min(self._free), 0
        if r.prompt_logprobs is None:
            self.metrics.prefix_cache_lookups_total.inc()
        return self.prefix.place(r, self._free, self.running)

    def _ready(self, r: Request) -> bool:
        """Whether `r` may prefill: not while the request it shares a prefix with has not
        written that prefix (then it copies what it can: `PrefixIndex.copy_shared`)."""
        if r.share_from is None:
            return True
        n = self.prefix.copy_shared(r, self.running, self.cache)
        if n is None:
            return False
        if n:
            r.prefilled = n
            self._reused(r, n)
        return True

    def _reused(self, r: Request, n: int) -> None:
        r.cached_tokens = n
        self.metrics.prefix_cache_hits_total.inc()
        self.metrics.prompt_tokens_cached_total.inc(n)

    def _decode(self, outs) -> None:
        reqs = [r for r in self.running if r.decoding]
        if not reqs:
            return
        self._compact(reqs)  # now in rows 0..n-1: the cache reads them as views, not copies
        reqs.sort(key=lambda r: r.slot)
        self.metrics.batch_size.observe(len(reqs))
        decs, drafters = [r.decoder for r in reqs], [r.drafter for r in reqs]
        pieces, verified = decode_step(self.model, self.cache, slice(0, len(reqs)), decs, drafters, self.spec)
        if verified is not None:
            self._speculated(reqs, verified)
        self._emit(reqs, pieces, outs)

    def _speculated(self, reqs: list[Request], verified) -> None:
        m = self.metrics
        for r, n, k in zip(reqs, verified.drafted, verified.matched):
            if n:
                source = r.drafter.source
                m.spec_draft_tokens_total.labels(source=source).inc(n)
                m.spec_accepted_tokens_total.labels(source=source).inc(k)
                m.spec_accepted_length.observe(k)

    def _compact(self, decoding: list[Request]) -> None:
        """Move decoding rows into cache rows 0..d-1. Attention reads a contiguous range of rows
        as views; any other set of rows is gathered, a copy of every layer's keys and values at
        every step, as many bytes as attention itself reads. A row moves once,
        when a request below it finishes, and costs one copy of that row."""
        d = len(decoding)
        misplaced = [r for r in decoding if r.slot >= d]
        if not misplaced:
            return
        holder = {r.slot: r for r in self.running}
        targets = [s for s in range(d) if s not in holder or not holder[s].decoding]
        src, dst = [], []
        for r, t in zip(misplaced, targets):
            # The two rows swap: a request still prefilling moves up, and so do the cached
            # contents of a free row (moving over them would evict them).
            src += [r.slot, t]
            dst += [t, r.slot]
            other = holder.get(t)
            if other is not None:
                other.slot = r.slot
            else:
                self._free.remove(t)
                self._free.add(r.slot)
            if self.prefix is not None:
                self.prefix.swap(r.slot, t)
            r.slot = t
        positions = max(1, int(self.cache.lengths[torch.tensor(src)].max()))
        self.cache.reorder(torch.tensor(src), torch.tensor(dst), positions=positions)

    def _prefill(self, outs) -> None:
        """One forward over prompts of the prefilling requests (oldest first), padded (rows x
        widest chunk) to at most `prefill_chunk` tokens; a model that cannot take a prompt in
        chunks (the encoder-decoder's source) gets whole prompts, at least one per step."""
        budget = self.prefill_chunk
        chunked = self.model.prefills_in_chunks
        picked: list[tuple[Request, int]] = []
        width = 0
        for r in self.running:
            if r.decoding or not self._ready(r):
                continue
            left = len(r.prompt) - r.prefilled
            n = min(left, budget) if chunked else left
            if picked and (len(picked) + 1) * max(width, n) > budget:
                break
            picked.append((r, n))
            width = max(width, n)
        if not picked:
            return
        rows = torch.tensor([r.slot for r, _ in picked])
        scoring = [i for i, (r, _) in enumerate(picked) if r.prompt_logprobs is not None]
        if not scoring and all(r.prefilled == 0 and n == len(r.prompt) for r, n in picked):
            logits = self.model.start([r.prompt for r, _ in picked], self.cache, rows=rows)
        else:  # chunks continue rows that earlier chunks (or admission's reset) left in the cache
            ids = torch.zeros(len(picked), width, dtype=torch.long)
            for i, (r, n) in enumerate(picked):
                ids[i, :n] = torch.tensor(r.prompt[r.prefilled : r.prefilled + n])
            n_tokens = torch.tensor([n for _, n in picked])
            ids = ids.to(self.model.device)
            if scoring:  # logits at every position (B, T, V): the prompts' own tokens are scored from them
                every = self.model(ids, cache=self.cache, rows=rows, n_tokens=n_tokens)
                logits = every[
                    torch.arange(len(picked), device=every.device), (n_tokens - 1).to(every.device)
                ]
                for i in scoring:
                    r, n = picked[i]
                    self._score_prompt(r, every[i, :n])
            else:
                logits = self.model.step(ids, self.cache, rows=rows, n_tokens=n_tokens)
        done = []
        for i, (r, n) in enumerate(picked):
            r.prefilled += n
            if r.prefilled == len(r.prompt):
                done.append(i)
        scored_only = [i for i in done if picked[i][0].max_new_tokens == 0]
        if scored_only:  # a budget of 0: the prompt is read and scored, nothing is generated
            now = time.monotonic()
            for i in scored_only:
                self._finish(picked[i][0], "length", outs, now)
            done = [i for i in done if i not in scored_only]
        if done:
            self._sample([picked[i][0] for i in done], logits[done], outs)

    def _score_prompt(self, r: Request, logits: torch.Tensor) -> None:
        """Score the prompt tokens that a chunk's logits (n, V) predict, from r.prefilled on."""
        if r.scored is None:
            r.scored = PromptLogprobs(list(r.prompt))
        r.scored.score(logits, r.prefilled, r.prompt_logprobs, r.decoder.vocab_size)

    # --- sampling and finishing --------------------------------------------------------

    def _sample(self, reqs: list[Request], logits: torch.Tensor, outs) -> None:
        """One token for each request from its logits row, through its decoder."""
        # Every piece carries its chosen-token logprob (the API may need it at top_n = 0): one
        # reduction over (B, vocab), small beside the forward that produced the logits.
        self._emit(reqs, decode_tokens(logits, [r.decoder for r in reqs]), outs)

    def _emit(self, reqs: list[Request], pieces: list[Piece], outs) -> None:
        """Hand each request its piece of this step (one token, or a verified draft's several)."""
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens_total.inc(sum(len(p.token_ids) for p in pieces))
        for r, piece in zip(reqs, pieces):
            if r.first_token_at is None:
                r.first_token_at = now
                m.time_to_first_token_seconds.observe(now - r.arrival)
                piece.prompt_logprobs = r.scored
            else:  # a verified draft's tokens arrive together: each counts its share of the wait
                k = max(1, len(piece.token_ids))
                for _ in range(k):
                    m.inter_token_latency_seconds.observe((now - r.last_token_at) / k)
            r.last_token_at = now
            piece.cached_tokens = r.cached_tokens
            outs.append((r, piece))
            if piece.finish_reason is not None:
                self._release(r, piece.finish_reason, now)

    def _finish(self, r: Request, reason: str, outs, now: float, flush: bool = False) -> None:
        """End a request outside of sampling (cancel, timeout, error) with a token-less piece."""
        if r.decoder is not None:
            piece = r.decoder.end(reason, flush=flush)
        else:
            piece = Piece(finish_reason=reason, prompt_tokens=len(r.prompt))
        piece.cached_tokens = r.cached_tokens
        if r.first_token_at is None and r.scored is not None and r.scored.complete:  # a budget of 0
            piece.prompt_logprobs = r.scored
        outs.append((r, piece))
        self._release(r, reason, now)

    def _release(self, r: Request, reason: str, now: float) -> None:
        if self.spec is not None:
            self.spec.release(r.drafter)
        if r.slot >= 0:
            if self.prefix is not None:
                if reason == "error":  # a forward failed part-way: the row's keys are not to be trusted
                    self.prefix.forget(r.slot)
                else:
                    tokens = r.prompt + (r.decoder.output_ids if r.decoder is not None else [])
                    self.prefix.release(r.slot, tokens, int(self.cache.lengths[r.slot]))
            self._free.add(r.slot)
            r.slot = -1
            self.running.remove(r)
            self.set_gauges()  # before the request's last piece is delivered
        self.metrics.request_finished_total.labels(finish_reason=reason).inc()
        self.metrics.e2e_request_latency_seconds.observe(now - r.arrival)

    def set_gauges(self) -> None:
        """The running and KV-slot gauges: set here only, whenever a slot is taken or freed."""
        self.metrics.requests_running.set(len(self.running))
        self.metrics.kv_slots_used.set(self.slots_in_use)
