"""The continuous-batching engine, driven directly (no HTTP) with tiny models."""

import asyncio
import time

import pytest
import torch

import gpt
import server.engine
import server.model_prep
from gpt import SamplingParams
from gpt.compile import is_compiled
from server.engine import Engine, EngineClosed, QueueFull

TOK = gpt.get_tokenizer("byte")


def run(coro, limit: float = 60.0):
    """Run a coroutine on a fresh event loop; a hang fails the test instead of blocking the suite."""
    return asyncio.run(asyncio.wait_for(coro, limit))


async def collect(handle, *read):
    """(text, token ids, finish reason, the Outputs) of one request; `read`: its outputs already
    taken (its first piece may also be its last: a speculative step can give every token)."""
    outs = [*read] + [o async for o in handle]
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason, outs


def slow_steps(model, seconds: float):
    """Make every forward of `model` take at least `seconds` per token of each row (a speculative
    step verifies several), to give cancels and timeouts time to act."""
    step = model.step

    def slow(tokens, *args, **kwargs):
        time.sleep(seconds * tokens.shape[1])
        return step(tokens, *args, **kwargs)

    model.step = slow
    return model


async def settle(engine: Engine, limit: float = 5.0):
    """Wait until the engine has nothing queued or running (the step after a cancel)."""
    deadline = time.monotonic() + limit
    while (engine.stats().waiting or engine.stats().running) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def gauges(engine: Engine) -> tuple[float, float, float]:
    m = engine.metrics
    return tuple(m.value(f"gptserve_{g}") for g in ("requests_waiting", "requests_running", "kv_slots_used"))


PROMPTS = [
    "hello world",
    "a",
    "the quick brown fox jumps over",
    "xyz",
    "Once upon a time",
    "42",
    "foo bar baz",
]


def test_more_requests_than_slots_all_complete_with_the_text_of_gpt_complete(tiny_gpt):
    # different lengths: requests finish on different steps, leaving holes the next ones fill
    params = [
        SamplingParams(max_new_tokens=4 + 5 * (i % 3), temperature=0, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    want = gpt.complete(tiny_gpt, TOK, PROMPTS, params)
    decode_rows = []
    step = tiny_gpt.step

    def record(tokens, cache, rows=None, n_tokens=None, every=False):
        if tokens.shape[1] == 1:
            decode_rows.append(rows)
        return step(tokens, cache, rows=rows, n_tokens=n_tokens, every=every)

    tiny_gpt.step = record

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=3, prefill_chunk=8)
        try:
            handles = [engine.submit(TOK.encode(p), s) for p, s in zip(PROMPTS, params)]
            return await asyncio.gather(*map(collect, handles))
        finally:
            await engine.shutdown(1)

    got = run(main())
    for (text, ids, reason, outs), c, p in zip(got, want, params):
        assert (text, ids, reason) == (c.text, c.token_ids, "length")
        assert outs[-1].completion_tokens == p.max_new_tokens and outs[-1].prompt_tokens == c.prompt_tokens
        assert [round(x, 4) for o in outs for x in o.logprobs] == [round(x, 4) for x in c.logprobs]
    # decode batches are always the leading cache rows, which attention reads without copying
    assert decode_rows and all(isinstance(r, slice) and r.start == 0 for r in decode_rows)


def test_rows_moved_to_keep_the_decode_batch_contiguous_keep_their_cache(tiny_gpt):
    # A and B take rows 0 and 1; A finishes and C takes row 0 while B still decodes in row 1:
    # B swaps rows with C (mid-prefill), and then rows move again as B finishes before C.
    jobs = [(TOK.encode("ab"), 3), (TOK.encode("cd"), 30), (list(range(70, 100)), 6)]
    want = [
        gpt.complete(tiny_gpt, TOK, [p], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
        for p, n in jobs
    ]
    moves = []  # (source rows, destination rows) of every row move in the cache the engine made
    new_cache = tiny_gpt.new_cache

    def recording_cache(*args, **kwargs):  # the engine's cache comes from model.new_cache
        cache = new_cache(*args, **kwargs)
        reorder = cache.reorder

        def recording_reorder(src, dst=None, **kwargs):
            moves.append((src.tolist(), None if dst is None else dst.tolist()))
            return reorder(src, dst, **kwargs)

        cache.reorder = recording_reorder
        return cache

    tiny_gpt.new_cache = recording_cache

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2, prefill_chunk=4)
        try:
            handles = [
                engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                for p, n in jobs
            ]
            return await asyncio.gather(*map(collect, handles))
        finally:
            await engine.shutdown(1)

    got = run(main())
    assert [(t, ids) for t, ids, _, _ in got] == [(c.text, c.token_ids) for c in want]
    # the logprobs see the whole cache: a row that lost its keys in a move would differ here
    for (_, _, _, outs), c in zip(got, want):
        assert [o for out in outs for o in out.logprobs] == pytest.approx(c.logprobs, abs=1e-4)
    assert ([1, 0], [0, 1]) in moves  # the swap with the prefilling request happened


def test_long_prompt_prefills_in_chunks_while_a_running_stream_keeps_decoding(tiny_gpt):
    calls = []  # (batch rows, tokens per row) of every forward, in order
    step = tiny_gpt.step

    def record(tokens, cache, rows=None, n_tokens=None, every=False):
        calls.append(tuple(tokens.shape))
        return step(tokens, cache, rows=rows, n_tokens=n_tokens, every=every)

    tiny_gpt.step = record
    long_prompt = list(range(65, 65 + 50))  # 50 tokens in chunks of 8: 7 prefill forwards
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = gpt.complete(tiny_gpt, TOK, [long_prompt], params)[0]

    async def main():
        # speculative steps would be wider forwards too: off, to count the prefills
        engine = Engine(tiny_gpt, TOK, max_batch_size=4, prefill_chunk=8, speculative="off")
        try:
            streaming = engine.submit(
                TOK.encode("hi"), SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
            )
            first = await streaming.__anext__()
            calls.clear()
            long = engine.submit(long_prompt, params)
            got_long, rest = await asyncio.gather(collect(long), collect(streaming))
            return first, got_long, rest
        finally:
            await engine.shutdown(1)

    calls.clear()
    first, (text, ids, reason, outs), rest = run(main())
    assert (text, ids, reason) == (want.text, want.token_ids, "length")  # chunking changed nothing
    assert [x for o in outs for x in o.logprobs] == pytest.approx(want.logprobs, abs=1e-4)
    assert len(first.token_ids) + len(rest[1]) == 40 and rest[2] == "length"
    prefills = [i for i, (_, t) in enumerate(calls) if t > 1]
    assert len(prefills) == 7 and all(calls[i] == (1, 8) for i in prefills[:-1])
    # between any two prefill chunks the running stream decoded a token
    assert all(calls[i + 1][1] == 1 for i in prefills[:-1])


def test_seeded_request_gives_the_same_text_alone_and_in_a_busy_batch(tiny_gpt):
    seeded = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    want = gpt.complete(tiny_gpt, TOK, ["Once upon a time"], seeded)[0].text

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=4, prefill_chunk=6)
        try:
            alone = (await collect(engine.submit(TOK.encode("Once upon a time"), seeded)))[0]
            others = [
                engine.submit(
                    TOK.encode(p),
                    SamplingParams(max_new_tokens=5 + 3 * i, temperature=1.2, seed=i if i % 2 else None),
                )
                for i, p in enumerate(PROMPTS)
            ]
            busy = engine.submit(TOK.encode("Once upon a time"), seeded)
            results = await asyncio.gather(collect(busy), *map(collect, others))
            return alone, results[0][0]
        finally:
            await engine.shutdown(1)

    alone, busy = run(main())
    assert alone == busy == want
    assert len(set(alone)) > 5  # really sampled, not a greedy repetition


def test_stop_string_spanning_tokens_ends_the_text_before_it_and_never_leaks(tiny_gpt):
    base = dict(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    full = gpt.complete(tiny_gpt, TOK, ["abc"], SamplingParams(**base))[0].text
    at = next(
        i
        for i in range(8, len(full) - 2)
        if full[i : i + 3].isprintable() and "\ufffd" not in full[i : i + 3]
    )
    stop = full[at : at + 3]  # three byte tokens: the match spans tokens
    want = full[: full.index(stop)]

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        try:
            return await collect(
                engine.submit(TOK.encode("abc"), SamplingParams(**base, stop=[stop, "\x00never"]))
            )
        finally:
            await engine.shutdown(1)

    text, _, reason, outs = run(main())
    assert (text, reason) == (want, "stop")
    assert all(stop not in o.text for o in outs)


def test_end_of_text_stops_unless_ignore_eos_and_length_ends_at_max_tokens(tiny_gpt):
    force_eot = {TOK.eot_token: 100.0}

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        try:
            return await asyncio.gather(
                collect(engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5, logit_bias=force_eot))),
                collect(
                    engine.submit(
                        [1, 2, 3], SamplingParams(max_new_tokens=5, logit_bias=force_eot, ignore_eos=True)
                    )
                ),
            )
        finally:
            await engine.shutdown(1)

    (text, ids, reason, outs), (_, ids2, reason2, outs2) = run(main())
    assert (text, ids, reason, outs[-1].completion_tokens) == ("", [TOK.eot_token], "stop", 1)
    assert (ids2, reason2, outs2[-1].completion_tokens) == ([TOK.eot_token] * 5, "length", 5)


def test_top_logprobs_are_reported_per_token(tiny_gpt):
    params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    want = gpt.complete(tiny_gpt, TOK, ["hey"], params)[0]

    async def main():
        engine = Engine(tiny_gpt, TOK)
        try:
            return await collect(engine.submit(TOK.encode("hey"), params))
        finally:
            await engine.shutdown(1)

    _, ids, _, outs = run(main())
    tops = [t for o in outs for t in o.top_logprobs]
    assert len(tops) == 4 and all(len(t) == 3 for t in tops)
    assert [max(t, key=t.get) for t in tops] == ids  # greedy picks the most likely token
    assert [sorted(t) for t in tops] == [sorted(t) for t in want.top_logprobs]


def test_cancel_frees_slots_and_brings_the_gauges_back_to_zero(tiny_gpt):
    slow_steps(tiny_gpt, 0.01)
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        try:
            handles = [engine.submit([5, 6, 7], long) for _ in range(4)]  # two run, two wait
            first = await handles[0].__anext__()
            deadline = time.monotonic() + 5  # the engine thread may still be admitting the second one
            while (engine.stats().slots_in_use, engine.stats().waiting) != (
                2,
                2,
            ) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            stats = engine.stats()
            assert first.finish_reason is None and stats.slots_in_use == 2 and stats.waiting == 2
            for h in handles:
                h.cancel()
            results = await asyncio.gather(*map(collect, handles))
            await settle(engine)
            stats = engine.stats()
            state = (stats.running, stats.waiting, stats.slots_in_use, gauges(engine))
            after = await collect(engine.submit([5, 6], SamplingParams(max_new_tokens=3)))  # slots reusable
            return results, state, after, engine.metrics
        finally:
            await engine.shutdown(1)

    results, state, after, metrics = run(main())
    assert [r[2] for r in results] == ["cancelled"] * 4
    assert all(len(r[1]) < 50 for r in results)
    assert state == (0, 0, 0, (0.0, 0.0, 0.0))
    assert after[2] in ("stop", "length")
    assert metrics.value("gptserve_request_finished_total", finish_reason="cancelled") == 4


def test_timeout_ends_running_and_queued_requests_and_frees_their_slots(tiny_gpt):
    slow_steps(tiny_gpt, 0.02)
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=1)
        try:
            running = engine.submit([5, 6, 7], long, timeout=0.3)
            queued = engine.submit([5, 6, 7], long, timeout=0.1)  # expires before the slot frees up
            results = await asyncio.gather(collect(running), collect(queued))
            await settle(engine)
            return results, gauges(engine)
        finally:
            await engine.shutdown(1)

    ((_, r_ids, r_reason, _), (_, q_ids, q_reason, q_outs)), gauge_values = run(main())
    assert r_reason == q_reason == "timeout"
    assert 0 < len(r_ids) < 50 and q_ids == [] and q_outs[-1].completion_tokens == 0
    assert gauge_values == (0.0, 0.0, 0.0)


def test_full_queue_raises_queue_full(tiny_gpt):
    slow_steps(tiny_gpt, 0.01)
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=1, max_queue=2)
        try:
            running = engine.submit([1, 2], long)
            await running.__anext__()  # holds the only slot now
            queued = [engine.submit([1, 2], long) for _ in range(2)]
            with pytest.raises(QueueFull):
                engine.submit([1, 2], long)
            for h in [running, *queued]:
                h.cancel()
            await asyncio.gather(*map(collect, [running, *queued]))
        finally:
            await engine.shutdown(1)

    run(main())


def test_shutdown_lets_requests_finish_then_refuses_new_ones(tiny_gpt):
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        handles = [engine.submit(TOK.encode(p), params) for p in PROMPTS[:5]]
        results = asyncio.gather(*map(collect, handles))
        await engine.shutdown(grace=30)
        assert engine.draining
        with pytest.raises(EngineClosed):
            engine.submit([1], params)
        return await results

    assert [r[2] for r in run(main())] == ["length"] * 5


def test_shutdown_cancels_what_outlasts_the_grace_period(tiny_gpt):
    slow_steps(tiny_gpt, 0.01)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=1)
        handles = [
            engine.submit([1, 2], SamplingParams(max_new_tokens=60, ignore_eos=True)) for _ in range(2)
        ]
        await engine.shutdown(grace=0.1)
        return await asyncio.gather(*map(collect, handles)), gauges(engine)

    results, gauge_values = run(main())
    assert [r[2] for r in results] == ["cancelled", "cancelled"]
    assert gauge_values == (0.0, 0.0, 0.0)


def test_a_failing_forward_ends_its_requests_with_error_and_the_engine_keeps_serving(tiny_gpt):
    step, failed_once = tiny_gpt.step, []

    def flaky(tokens, *args, **kwargs):
        # the first step decoding both requests together (counting calls instead raced the
        # second request's admission when the machine was busy)
        if tokens.shape[0] == 2 and not failed_once:
            failed_once.append(1)
            raise RuntimeError("simulated failure inside the model")
        return step(tokens, *args, **kwargs)

    tiny_gpt.step = flaky
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        try:
            failed = await asyncio.gather(*(collect(engine.submit([1, 2, 3], params)) for _ in range(2)))
            after = await collect(engine.submit([1, 2, 3], params))
            await settle(engine)
            return failed, after, gauges(engine)
        finally:
            await engine.shutdown(1)

    failed, after, gauge_values = run(main())
    assert [f[2] for f in failed] == ["error", "error"]
    assert after[2] == "length" and len(after[1]) == 10
    assert gauge_values == (0.0, 0.0, 0.0)


def test_encoder_decoder_model_is_served_with_the_text_of_gpt_complete(tiny_s2s):
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = gpt.complete(tiny_s2s, TOK, PROMPTS, params)

    async def main():
        engine = Engine(tiny_s2s, TOK, max_batch_size=3, prefill_chunk=16)
        try:
            return await asyncio.gather(*(collect(engine.submit(TOK.encode(p), params)) for p in PROMPTS))
        finally:
            await engine.shutdown(1)

    got = run(main())
    assert [(t, ids) for t, ids, _, _ in got] == [(c.text, c.token_ids) for c in want]
    for (_, _, _, outs), c in zip(got, want):
        assert [x for o in outs for x in o.logprobs] == pytest.approx(c.logprobs, abs=1e-4)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([1, 300], SamplingParams(), "300"),
        (
            [1] * 60,
            SamplingParams(max_new_tokens=10),
            "the prompt has 60 tokens and max_new_tokens is 10: 70 tokens, more than the model's "
            "context of 64",
        ),
        ([1, 2], SamplingParams(max_new_tokens=8, num_beams=2), "submit_beams"),
        ([1, 2], SamplingParams(max_new_tokens=8, logit_bias={999: 1.0}), "999"),
    ],
)
def test_bad_requests_are_refused_at_submit_with_a_clear_message(tiny_gpt, prompt, params, message):
    async def main():
        engine = Engine(tiny_gpt, TOK)
        try:
            with pytest.raises(ValueError, match=message):
                engine.submit(prompt, params)
            assert engine.stats().waiting == 0
        finally:
            await engine.shutdown(1)

    run(main())


@pytest.mark.parametrize("where", ["decoder", "after-taking-a-row"])
def test_a_request_whose_admission_fails_ends_alone_and_loses_no_slot(tiny_gpt, monkeypatch, where):
    import server.scheduler as scheduler

    poison = [9, 9, 9]
    if where == "decoder":
        real = scheduler.SequenceDecoder

        def decoder(tokenizer, prompt, *args, **kwargs):
            if list(prompt) == poison:
                raise RuntimeError("boom")
            return real(tokenizer, prompt, *args, **kwargs)

        monkeypatch.setattr(scheduler, "SequenceDecoder", decoder)
    else:
        real_claim = scheduler.PrefixIndex.claim

        def claim(self, row, prompt):
            if list(prompt) == poison:
                raise RuntimeError("boom")
            return real_claim(self, row, prompt)

        monkeypatch.setattr(scheduler.PrefixIndex, "claim", claim)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        try:
            # all three queued before the engine thread looks: admitted in the same step
            handles = [engine.submit(p, params) for p in ([5, 6], poison, [7, 8])]
            results = await asyncio.gather(*map(collect, handles))
            await settle(engine)
            stats = engine.stats()
            after = await collect(engine.submit([5, 6], params))
            return results, stats, after
        finally:
            await engine.shutdown(1)

    results, stats, after = run(main())
    assert [r[2] for r in results] == ["length", "error", "length"]
    assert (stats.running, stats.slots_in_use) == (0, 0)
    assert after[1] == results[0][1]


def test_a_dead_engine_thread_fails_every_request_refuses_new_ones_and_says_so(tiny_gpt, monkeypatch):
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    slow_steps(tiny_gpt, 0.01)
    deaths = []

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2)
        engine.on_death = deaths.append
        running = [engine.submit([1, 2, 3], params) for _ in range(3)]  # two running, one waiting
        first = await running[0].__anext__()
        assert first.finish_reason is None

        def broken(*args, **kwargs):  # the step fails, and so does its recovery: the thread dies
            raise RuntimeError("corrupted state")

        monkeypatch.setattr(engine._sched, "step", broken)
        monkeypatch.setattr(engine._sched, "fail_all", broken)
        ends = await asyncio.gather(*(collect(h) for h in running))
        with pytest.raises(EngineClosed, match="restarted"):
            engine.submit([1], params)
        await engine.shutdown(1)
        return ends, engine

    ends, engine = run(main(), limit=20)
    assert [e[2] for e in ends] == ["error"] * 3
    assert engine.dead and "corrupted state" in engine.dead
    assert engine.draining and len(deaths) == 1


def _reference_prompt_logprobs(model, ids):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids]))[0, :, : TOK.vocab_size].float(), dim=-1)


def test_prompt_logprobs_are_scored_in_chunks_beside_decoding_and_ride_on_the_first_piece(tiny_gpt):
    long_prompt = TOK.encode("the quick brown fox jumps over the lazy dog")  # 43 tokens: 9 chunks of 5
    ref = _reference_prompt_logprobs(tiny_gpt, long_prompt)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=3, prefill_chunk=5)
        try:
            busy = engine.submit(
                TOK.encode("busy"), SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
            )
            first = await busy.__anext__()  # decoding while the others prefill
            score = engine.submit(long_prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=2))
            both = engine.submit(
                long_prompt,
                SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=0),
            )
            results = await asyncio.gather(collect(score), collect(both), collect(busy, first))
            await settle(engine)
            return results, engine.stats()
        finally:
            await engine.shutdown(1)

    (score, both, busy), stats = run(main())
    _, ids, reason, outs = score
    assert ids == [] and reason == "length" and outs[-1].completion_tokens == 0
    scored = outs[0].prompt_logprobs
    assert scored.token_ids == long_prompt and scored.logprobs[0] is None and scored.top_logprobs[0] is None
    want = [ref[k - 1, long_prompt[k]].item() for k in range(1, len(long_prompt))]
    assert scored.logprobs[1:] == pytest.approx(want, abs=1e-5)
    for k in range(1, len(long_prompt)):
        assert sorted(scored.top_logprobs[k].values(), reverse=True) == pytest.approx(
            ref[k - 1].topk(2).values.tolist(), abs=1e-5
        )
    _, ids, reason, outs = both
    assert len(ids) == 3 and reason == "length"
    assert outs[0].prompt_logprobs.logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert all(t == {} for t in outs[0].prompt_logprobs.top_logprobs[1:])  # no alternatives asked
    assert all(o.prompt_logprobs is None for o in outs[1:])
    assert busy[2] == "length" and all(o.prompt_logprobs is None for o in busy[3])
    assert stats.slots_in_use == 0 and stats.running == 0


def test_nothing_to_generate_nor_score_ends_at_admission_without_a_slot(tiny_gpt):
    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=1)
        try:
            handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=0))
            result = await collect(handle)
            return result, gauges(engine)
        finally:
            await engine.shutdown(1)

    (text, ids, reason, outs), gauge_values = run(main())
    assert (text, ids, reason) == ("", [], "length") and outs[-1].prompt_logprobs is None
    assert outs[-1].prompt_tokens == 3 and gauge_values == (0.0, 0.0, 0.0)


def test_prompt_logprobs_are_refused_for_an_encoder_decoder_and_out_of_range(tiny_gpt, tiny_s2s):
    async def main():
        for model, value, message in (
            (tiny_s2s, 1, "decoder-only"),
            (tiny_gpt, 21, r"\[0, 20\]"),
            (tiny_gpt, True, r"\[0, 20\]"),
        ):
            engine = Engine(model, TOK)
            try:
                with pytest.raises(gpt.RequestError, match=message) as e:
                    engine.submit([1, 2], SamplingParams(max_new_tokens=2, prompt_logprobs=value))
                assert e.value.param == "prompt_logprobs" and engine.stats().waiting == 0
            finally:
                await engine.shutdown(1)

    run(main())


def serve_one_compiled(model, prompt: str, params: SamplingParams, limit: float = 300):
    """(text, token ids, finish reason) of one request to an engine built with compile_decode=True."""

    async def main():
        engine = Engine(model, TOK, max_batch_size=2, compile_decode=True)
        try:
            return await collect(engine.submit(TOK.encode(prompt), params))
        finally:
            await engine.shutdown(1)

    return run(main(), limit=limit)[:3]


@pytest.mark.slow
def test_a_compiled_engine_warms_up_at_start_and_streams_the_eager_text(tiny_gpt):
    twin = gpt.GPT(tiny_gpt.config).eval()
    twin.load_state_dict(tiny_gpt.state_dict())
    model, eager = gpt.quantize(tiny_gpt, "int8"), gpt.quantize(twin, "int8")
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = gpt.complete(eager, TOK, ["Once upon a time"], [params])[0]
    got = serve_one_compiled(model, "Once upon a time", params)
    assert is_compiled(model) and got == (want.text, want.token_ids, "length")


def test_where_compiling_fails_the_engine_warns_and_serves_uncompiled(tiny_gpt, monkeypatch, caplog):
    def broken(model, cache=None):
        raise RuntimeError("no C++ compiler here\nmore detail")

    monkeypatch.setattr(server.model_prep, "warm_up", broken)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    want = gpt.complete(tiny_gpt, TOK, ["hi"], [params])[0]
    with caplog.at_level("WARNING"):
        got = serve_one_compiled(tiny_gpt, "hi", params, limit=60)
    assert not is_compiled(tiny_gpt) and got == (want.text, want.token_ids, "length")
    assert any(
        "torch.compile failed (RuntimeError: no C++ compiler here)" in r.getMessage() for r in caplog.records
    )


def test_a_float16_kv_cache_streams_what_the_library_decodes_from_one(tiny_gpt):
    """The engine's cache in float16 (`--kv-cache-dtype float16`): batched and prefilled in
    chunks, each request gets the tokens the library decodes alone from a float16 cache."""
    import torch

    def alone(prompt, n):
        cache, out = tiny_gpt.new_cache(1, dtype=torch.float16), []
        with torch.inference_mode():
            logits = tiny_gpt.start([TOK.encode(prompt)], cache)
            for _ in range(n):
                out.append(int(logits.argmax(-1)))
                logits = tiny_gpt.step(torch.tensor([[out[-1]]]), cache)
        return out

    params = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=3, prefill_chunk=8, kv_cache_dtype=torch.float16)
        assert engine._sched.cache.layers[0].k.dtype == torch.float16
        try:
            return await asyncio.gather(*(collect(engine.submit(TOK.encode(p), params)) for p in PROMPTS))
        finally:
            await engine.shutdown(1)

    for (_, ids, _, _), p in zip(run(main()), PROMPTS):
        assert ids == alone(p, 9)


def test_the_model_is_prepared_with_the_torch_thread_count_of_the_engine_thread(tiny_gpt, monkeypatch):
    # dynamo guards compiled graphs on it: prepared with another, they compiled again mid-serving
    seen = []
    monkeypatch.setattr(server.engine, "prepare_model", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as gpt-serve's main thread
    try:
        Engine(tiny_gpt, TOK, max_batch_size=1, threads=2)
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
