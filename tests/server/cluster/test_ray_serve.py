"""`gpt-serve --replicas 2` on a local Ray cluster, as a user starts it: the API answers as the
single server does, conversations stay on the replica that caches them, metrics reach one scrape,
and a replica killed with SIGKILL under load is replaced without a request hanging."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import save_tiny, start_live_server, tiny_settings

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve")

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "You are a helpful assistant who answers questions about the weather, briefly and kindly."


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,comm="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1] == str(sid)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # room for a few turns of a chat in a byte-level tokenizer
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-gpt", block_size=512)


@pytest.fixture(scope="module")
def ray_server(checkpoint):
    """The Ray server's URL; at the end, SIGTERM must stop it with 0 and leave nothing running."""
    args = [sys.executable, "-m", "server", "--model", checkpoint, "--replicas", "2", "--port", "0"]
    args += ["--api-key", KEY, "--max-batch-size", "8", "--served-model-name", "tiny-gpt"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url, lines, deadline = None, [], time.monotonic() + 150
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("gpt-serve: serving"):
            url = line.split(" at ", 1)[1].split()[0]
    if url is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("gpt-serve --replicas 2 did not start:\n" + "".join(lines[-30:]))
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(1)
        left = _session_processes(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        assert code == 0, f"exit code {code}"
        assert not left, f"left running: {left}"


@pytest.fixture(scope="module")
def single_server(checkpoint):
    server = start_live_server(tiny_settings(checkpoint, api_key=KEY, max_batch_size=8))
    yield server.url
    server.stop()


def _normal(body):
    """A reply without what differs between any two runs: ids, times, cached-token counts."""
    if isinstance(body, dict):
        return {k: _normal(v) for k, v in body.items() if k not in ("id", "created", "cached_tokens")}
    if isinstance(body, list):
        return [_normal(v) for v in body]
    return body


def _close(a, b) -> bool:
    """Equal, floats within 1e-4: logprobs come from another process, whose kernels may sum in
    another order."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


REQUESTS = [
    (
        "POST",
        "/v1/completions",
        {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2},
    ),
    (
        "POST",
        "/v1/completions",
        {"prompt": "The sea", "max_tokens": 10, "temperature": 0.9, "seed": 3, "n": 2},
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 1},
    ),
    ("POST", "/v1/completions", {"prompt": 5}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 100000}),
    ("POST", "/v1/chat/completions", {"messages": []}),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
    ("GET", "/v1/nowhere", None),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hello"}),
]


@pytest.mark.parametrize("method, path, body", REQUESTS, ids=[f"{m} {p}" for m, p, _ in REQUESTS])
def test_the_api_answers_as_the_single_server_does(ray_server, single_server, method, path, body):
    if body is not None and path.startswith("/v1/") and "model" not in body:
        body = {"model": "tiny-gpt", **body}
    replies = [
        httpx.request(method, url + path, json=body, headers=AUTH, timeout=60)
        for url in (ray_server, single_server)
    ]
    assert replies[0].status_code == replies[1].status_code
    assert _close(_normal(replies[0].json()), _normal(replies[1].json()))
    assert replies[0].headers["content-type"] == replies[1].headers["content-type"]


def test_auth_and_limits_hold_through_ray(ray_server):
    r = httpx.post(f"{ray_server}/v1/completions", json={"model": "tiny-gpt", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    huge = {"model": "tiny-gpt", "prompt": "x" * (3 * 1024 * 1024)}
    r = httpx.post(f"{ray_server}/v1/completions", json=huge, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "error" in r.json()


def test_streams_arrive_through_the_openai_client(ray_server, single_server):
    texts = []
    for url in (ray_server, single_server):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        stream = client.chat.completions.create(
            model="tiny-gpt",
            messages=[{"role": "user", "content": "tell me"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert texts[0] == texts[1] and texts[0]


def _chat(url: str, messages: list) -> tuple[str, str, int]:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny-gpt", "messages": messages, "max_tokens": 6, "temperature": 0},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], r.headers["x-gptserve-replica"], body["usage"]


def test_each_conversation_stays_on_the_replica_that_caches_it(ray_server):
    replicas = []
    for c in range(4):
        messages = [{"role": "system", "content": SYSTEM}]
        seen = set()
        for turn in range(3):
            messages.append({"role": "user", "content": f"conversation {c}, question {turn}: will it rain?"})
            reply, replica, usage = _chat(ray_server, messages)
            messages.append({"role": "assistant", "content": reply})
            seen.add(replica)
            if turn:
                assert usage["prompt_tokens_details"]["cached_tokens"] > len(SYSTEM)
        assert len(seen) == 1, f"conversation {c} moved between replicas: {seen}"
        replicas += seen
    assert len(set(replicas)) == 2  # new conversations go to the replica caching least
    metrics = httpx.get(f"{ray_server}/metrics").text
    affinity = [
        line
        for line in metrics.splitlines()
        if line.startswith('gptserve_router_decisions_total{decision="affinity"}')
    ]
    assert affinity and float(affinity[0].split()[-1]) >= 8


def test_every_replica_reports_to_one_scrape_and_to_health(ray_server):
    health = httpx.get(f"{ray_server}/health").json()
    ids = {r["replica"] for r in health["replicas"]}
    assert len(ids) == 2 and all(r["ready"] for r in health["replicas"])
    assert httpx.get(f"{ray_server}/ready").json()["replicas"] == 2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(f"{ray_server}/metrics").text
        labelled = {
            ln.split('replica="')[1].split('"')[0]
            for ln in text.splitlines()
            if ln.startswith("gptserve_requests_total{")
        }
        if labelled == ids:
            break
        time.sleep(0.5)
    assert labelled == ids


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, list[str]]:
    body = {
        "model": "tiny-gpt",
        "prompt": f"stream {i}",
        "max_tokens": 300,
        "stream": True,
        "ignore_eos": True,
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    return r.status_code, events


def _outcome(status: int, events: list[str]) -> str:
    assert status == 200 and events[-1] == "[DONE]", (status, events[-3:])
    errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e]
    if errors:
        assert errors[0]["code"] == "replica_failed"
        return "cut"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    return "completed"


def test_a_killed_replica_is_replaced_and_no_request_hangs(ray_server):
    victim = httpx.get(f"{ray_server}/health").json()["replicas"][0]["pid"]

    async def load():
        async with httpx.AsyncClient(timeout=120) as client:
            running = [asyncio.create_task(_stream(client, ray_server, i)) for i in range(12)]
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            after = [asyncio.create_task(_stream(client, ray_server, 100 + i)) for i in range(6)]
            return await asyncio.wait_for(asyncio.gather(*running), 120), await asyncio.wait_for(
                asyncio.gather(*after), 120
            )

    during, after = asyncio.run(load())
    outcomes = [_outcome(*r) for r in during]
    assert outcomes.count("completed") + outcomes.count("cut") == 12
    assert [_outcome(*r) for r in after] == ["completed"] * 6  # sent after the kill: served elsewhere
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        replicas = httpx.get(f"{ray_server}/health").json()["replicas"]
        if len(replicas) == 2 and victim not in {r["pid"] for r in replicas}:
            break
        time.sleep(1)
    assert len(replicas) == 2 and victim not in {r["pid"] for r in replicas}
    status, events = asyncio.run(_stream(httpx.AsyncClient(timeout=60), ray_server, 999))
    assert _outcome(status, events) == "completed"
