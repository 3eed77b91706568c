"""Concurrency: many streaming clients at once, seeds under load, aborted clients, metric counts."""

import asyncio
import threading
import time

import httpx
import openai
import pytest
from conftest import make_client, tiny_settings
from test_api_errors import wait_for_idle

from server.app import load_engine

NO_EOS = {"ignore_eos": True}


def metric(server, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent: counters appear on first use)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return 0.0


async def _stream_completion(client, model, **kw):
    text, reasons, usage = "", [], None
    async for chunk in await client.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **kw
    ):
        for c in chunk.choices:
            text += c.text
            if c.finish_reason:
                reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    return text, reasons, usage


async def _stream_chat(client, model, **kw):
    text, reasons = "", []
    async for chunk in await client.chat.completions.create(model=model, stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, reasons, None


def test_sixteen_concurrent_streaming_clients_match_their_solo_results(openai_client, live_server):
    jobs = [
        dict(prompt=f"client {i} says", max_tokens=10 + i, temperature=1.0, seed=100 + i, extra_body=NO_EOS)
        for i in range(16)
    ]
    solo = [openai_client.completions.create(model=live_server.model, **kw) for kw in jobs]
    chat_kw = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=12, seed=5, extra_body=NO_EOS)
    chat_solo = openai_client.chat.completions.create(model=live_server.model, **chat_kw)

    async def run_all():
        async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0) as client:
            tasks = [_stream_completion(client, live_server.model, **kw) for kw in jobs]
            tasks += [_stream_chat(client, live_server.model, **chat_kw) for _ in range(2)]
            return await asyncio.gather(*tasks)

    results = asyncio.run(run_all())
    for (text, reasons, usage), ref in zip(results, solo):
        assert text == ref.choices[0].text
        assert reasons == ["length"]
        counts = (
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        )  # cached_tokens depends on the cache's state
        assert [getattr(usage, k) for k in counts] == [getattr(ref.usage, k) for k in counts]
        assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    for text, reasons, _ in results[16:]:
        assert text == chat_solo.choices[0].message.content and reasons == ["length"]
    wait_for_idle(live_server)


def test_seeded_requests_reproduce_whatever_else_is_in_the_batch(openai_client, live_server):
    seeded = dict(
        prompt="reproduce me", max_tokens=24, temperature=1.0, top_p=0.95, seed=2024, extra_body=NO_EOS
    )
    alone = openai_client.completions.create(model=live_server.model, **seeded).choices[0].text
    noise = [
        dict(
            prompt="noise " * (i + 1),
            max_tokens=5 + 7 * i,
            temperature=1.0,
            n=1 + i % 3,
            extra_body={"ignore_eos": True, "repetition_penalty": 1.2},
        )
        for i in range(6)
    ]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0) as client:
            tasks, mine = [], []
            for i in range(4):  # the seeded request, started at different moments of the noise
                tasks += [client.completions.create(model=live_server.model, **kw) for kw in noise[i : i + 2]]
                mine.append(len(tasks))
                tasks.append(client.completions.create(model=live_server.model, **seeded))
            results = await asyncio.gather(*tasks)
            return [results[i] for i in mine]

    texts = [r.choices[0].text for r in asyncio.run(run_all())]
    assert texts == [alone] * 4


def test_aborted_clients_free_their_slots(long_checkpoint, server_factory):
    settings = tiny_settings(long_checkpoint, max_batch_size=2, max_queue=8)
    server = server_factory(settings, engine=load_engine(settings))
    body = {"model": server.model, "prompt": "abort", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    client = httpx.Client(base_url=server.url, timeout=30)
    contexts, lines = [], []  # keep references: a collected stream closes its connection
    for _ in range(5):
        contexts.append(client.stream("POST", "/v1/completions", json=body))
        lines.append(contexts[-1].__enter__().iter_lines())
    for it in lines[:2]:
        next(it)  # the two admitted requests are streaming
    deadline = time.monotonic() + 10
    while metric(server, "gptserve_requests_waiting") != 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server, "gptserve_requests_running") == 2
    assert metric(server, "gptserve_requests_waiting") == 3
    assert metric(server, "gptserve_kv_slots_used") == 2
    for cm in contexts:  # the clients go away mid-stream (and while queued)
        cm.__exit__(None, None, None)
    client.close()
    wait_for_idle(server)
    assert metric(server, "gptserve_request_finished_total", finish_reason="cancelled") == 5

    # a non-streamed request whose client gives up is cancelled too, not run to the end
    def give_up():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)

    t = threading.Thread(target=give_up)
    t.start()
    t.join()
    wait_for_idle(server)
    assert metric(server, "gptserve_request_finished_total", finish_reason="cancelled") == 6
    assert metric(server, "gptserve_request_finished_total", finish_reason="length") == 0


def test_metric_counts_match_the_requests_sent(tiny_checkpoint, server_factory):
    settings = tiny_settings(tiny_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))
    client = make_client(server)
    prompt_tokens = completion_tokens = 0
    for i in range(3):
        r = client.completions.create(
            model=server.model, prompt="m" * (i + 1), max_tokens=4, extra_body=NO_EOS
        )
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
    for _ in range(2):
        chunks = list(
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=3,
                n=2,
                stream=True,
                extra_body=NO_EOS,
                stream_options={"include_usage": True},
            )
        )
        prompt_tokens += 2 * chunks[-1].usage.prompt_tokens  # two engine requests, one prompt each
        completion_tokens += chunks[-1].usage.completion_tokens
    for _ in range(4):
        httpx.post(server.url + "/v1/completions", json={"prompt": ""})
    httpx.post(server.url + "/v1/completions", json={"prompt": "x", "model": "other"})
    httpx.get(server.url + "/v1/models")

    assert metric(server, "gptserve_requests_total", endpoint="/v1/completions", status="200") == 3
    assert metric(server, "gptserve_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert metric(server, "gptserve_requests_total", endpoint="/v1/completions", status="400") == 4
    assert metric(server, "gptserve_requests_total", endpoint="/v1/completions", status="404") == 1
    assert metric(server, "gptserve_requests_total", endpoint="/v1/models", status="200") == 1
    assert metric(server, "gptserve_request_finished_total", finish_reason="length") == 3 + 2 * 2
    assert metric(server, "gptserve_generation_tokens_total") == completion_tokens
    assert metric(server, "gptserve_prompt_tokens_total") == prompt_tokens
    assert metric(server, "gptserve_time_to_first_token_seconds_count") == 7
    assert metric(server, "gptserve_e2e_request_latency_seconds_count") == 7


def test_a_request_past_its_timeout_ends_early_with_what_it_has(long_checkpoint, server_factory):
    settings = tiny_settings(long_checkpoint, timeout=0.3)
    server = server_factory(settings, engine=load_engine(settings))
    client = make_client(server)
    r = client.completions.create(model=server.model, prompt="slow", max_tokens=1800, extra_body=NO_EOS)
    assert r.choices[0].finish_reason == "length"  # OpenAI has no "timeout"; the output was cut at a limit
    assert r.usage.completion_tokens < 1800
    assert metric(server, "gptserve_request_finished_total", finish_reason="timeout") == 1
    wait_for_idle(server)
