"""The engine's Prometheus metrics count exactly what happened."""

import asyncio

import gpt
from gpt import SamplingParams
from server.engine import Engine
from server.metrics import Metrics

TOK = gpt.get_tokenizer("byte")
NAMES = [
    "requests_total",
    "request_finished_total",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "queue_wait_seconds",
    "requests_waiting",
    "requests_running",
    "kv_slots_used",
    "prompt_tokens_total",
    "generation_tokens_total",
    "batch_size",
]


def test_two_metrics_objects_do_not_collide_and_render_every_metric():
    a, b = Metrics(), Metrics()
    a.prompt_tokens_total.inc(3)
    assert a.value("gptserve_prompt_tokens_total") == 3 and b.value("gptserve_prompt_tokens_total") == 0
    body, content_type = a.render()
    assert content_type.startswith("text/plain")
    for name in NAMES:
        assert f"gptserve_{name}" in body.decode()


def test_engine_metrics_match_the_requests_it_served(tiny_gpt):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 10, [10, 11]]
    params = [
        SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=6, logit_bias={TOK.eot_token: 100.0}),
    ]  # stops at once

    async def drain(handle):
        return [o async for o in handle]

    async def main():
        engine = Engine(tiny_gpt, TOK, max_batch_size=2, prefill_chunk=4)
        try:
            handles = [engine.submit(p, s) for p, s in zip(prompts, params)]
            cancelled = engine.submit(prompts[3], params[0])
            cancelled.cancel()  # still queued behind the two slots: leaves without a token
            outs = await asyncio.gather(*map(drain, [*handles, cancelled]))
            while engine.stats().running or engine.stats().waiting:
                await asyncio.sleep(0.005)
            return [o[-1] for o in outs], engine.metrics
        finally:
            await engine.shutdown(1)

    last, m = asyncio.run(asyncio.wait_for(main(), 60))
    assert [o.finish_reason for o in last] == ["length", "length", "stop", "cancelled"]
    generated = sum(o.completion_tokens for o in last)
    assert generated == 6 + 6 + 1
    assert m.value("gptserve_generation_tokens_total") == generated
    assert m.value("gptserve_prompt_tokens_total") == 3 + 5 + 10  # the cancelled one never got a slot
    for reason, n in [("length", 2), ("stop", 1), ("cancelled", 1)]:
        assert m.value("gptserve_request_finished_total", finish_reason=reason) == n
    assert m.value("gptserve_time_to_first_token_seconds_count") == 3
    assert m.value("gptserve_inter_token_latency_seconds_count") == generated - 3
    assert m.value("gptserve_e2e_request_latency_seconds_count") == 4
    assert m.value("gptserve_queue_wait_seconds_count") == 3
    # every token after a request's first comes from a decode step, and each of those is one row
    # that gives one token and the drafted tokens it kept
    kept = sum(m.value("gptserve_spec_accepted_tokens_total", source=s) for s in ("ngram", "prediction"))
    assert m.value("gptserve_batch_size_sum") == generated - 3 - kept
    assert m.value("gptserve_spec_accepted_length_sum") == kept
    assert m.value("gptserve_batch_size_count") >= 5 or kept  # two slots: at least ceil(10 / 2) decode steps
    for gauge in ("requests_waiting", "requests_running", "kv_slots_used"):
        assert m.value(f"gptserve_{gauge}") == 0
    assert m.value("gptserve_requests_total", endpoint="/v1/completions", status="200") == 0  # the API's job
