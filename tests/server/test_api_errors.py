"""Bad input, authentication, unknown models, a full queue and draining: every failure is a
4xx/5xx carrying OpenAI's error object, and none leaks an engine slot."""

import time

import httpx
import openai
import pytest
from conftest import TINY_CONTEXT, make_client, tiny_settings

from server.app import drain, load_engine

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str)
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


BAD_BODIES = [
    # (endpoint, body, param)
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt"),
    (COMPLETIONS, {"prompt": ["ok", ""]}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "x"}}, "prompt"),
    (COMPLETIONS, {"prompt": [True, False]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1, 5]}, "prompt"),
    (COMPLETIONS, {"prompt": [10**6]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "top_p": NaN}', "top_p"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 10**20}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": True}, "n"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": ["a"] * 100}, "stop"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed"),
    (COMPLETIONS, {"prompt": "x", "seed": "abc"}, "seed"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias.5"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, "top_k"),
    (COMPLETIONS, {"prompt": "x", "top_k": 10**9}, "top_k"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, "min_p"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (
        COMPLETIONS,
        {"prompt": "x", "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    (COMPLETIONS, {"prompt": "x", "echo": "yes"}, "echo"),
    (COMPLETIONS, {"prompt": "x", "echo": 1}, "echo"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "x" * (TINY_CONTEXT + 5)}, "prompt"),
    (COMPLETIONS, {"prompt": "x" * 10, "max_tokens": TINY_CONTEXT}, "max_tokens"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "messages.1.role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
        "messages.0.content",
    ),
    (CHAT, {"messages": OK_CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    (CHAT, {"messages": OK_CHAT, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": OK_CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * TINY_CONTEXT}]}, "messages"),
]


@pytest.mark.parametrize(
    "endpoint, body, param", BAD_BODIES, ids=[f"{e[-11:]}-{p}-{i}" for i, (e, _, p) in enumerate(BAD_BODIES)]
)
def test_bad_request_bodies_get_400_naming_the_field(live_server, endpoint, body, param):
    if isinstance(body, bytes):  # what json= cannot encode (infinity, NaN)
        r = httpx.post(live_server.url + endpoint, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(live_server.url + endpoint, json=body, timeout=30)
    err = assert_error(r, 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_context_overflow_names_both_numbers(live_server):
    r = httpx.post(live_server.url + COMPLETIONS, json={"prompt": "x" * 10, "max_tokens": 500})
    message = assert_error(r, 400, "max_tokens", "context_length_exceeded")["message"]
    assert "10" in message and "500" in message and str(TINY_CONTEXT) in message


def test_the_operators_prompt_cap_is_a_400_naming_the_prompt(tiny_checkpoint, server_factory):
    settings = tiny_settings(tiny_checkpoint, max_prompt_tokens=8)
    server = server_factory(settings, engine=load_engine(settings))
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "x" * 9, "max_tokens": 2})
    message = assert_error(r, 400, "prompt", "context_length_exceeded")["message"]
    assert "9" in message and "8" in message
    r = httpx.post(
        server.url + CHAT, json={"messages": [{"role": "user", "content": "x" * 9}], "max_tokens": 2}
    )
    assert_error(r, 400, "messages", "context_length_exceeded")
    assert httpx.post(server.url + COMPLETIONS, json={"prompt": "x" * 8, "max_tokens": 2}).status_code == 200
    wait_for_idle(server)


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b'{"prompt": "x",}',
        b"",
        b"null",
        b"[1, 2]",
        b'"text"',
        b'{"prompt": "\xff\xfe"}',
        b"\xff\xfe\xfd",
    ],
)
def test_malformed_json_and_invalid_utf8_are_400(live_server, raw):
    r = httpx.post(live_server.url + COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_model_is_404_and_models_lists_the_served_one(openai_client, live_server):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [live_server.model]
    assert openai_client.models.retrieve(live_server.model).id == live_server.model
    assert_error(httpx.get(live_server.url + "/v1/models/nope"), 404, code="model_not_found")


def test_unknown_route_and_wrong_method_are_error_objects(live_server):
    assert_error(httpx.get(live_server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(live_server.url + COMPLETIONS), 405)


def test_api_key_is_required_on_the_api_but_not_on_probes(tiny_checkpoint, server_factory):
    server = server_factory(tiny_settings(tiny_checkpoint, api_key="s3cret"))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer s3cret-and-more"},
    ):
        for method, path in (
            ("POST", COMPLETIONS),
            ("POST", CHAT),
            ("GET", "/v1/models"),
            ("POST", "/tokenize"),
        ):
            r = httpx.request(
                method, server.url + path, headers=headers, json={"prompt": "x", "messages": OK_CHAT}
            )
            assert_error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        make_client(server, api_key="wrong").completions.create(model=server.model, prompt="x", max_tokens=1)
    ok = make_client(server, api_key="s3cret").completions.create(
        model=server.model, prompt="x", max_tokens=2
    )
    assert ok.usage.prompt_tokens == 1
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


def _gauge(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f"gptserve_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no gauge {name}")


def wait_for_idle(server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gauge(server, g) == 0 for g in ("requests_running", "requests_waiting", "kv_slots_used")):
            return
        time.sleep(0.05)
    raise AssertionError("running/waiting/slot gauges did not return to 0")


def test_full_queue_gives_429_with_retry_after(long_checkpoint, server_factory):
    settings = tiny_settings(long_checkpoint, max_batch_size=1, max_queue=1)
    server = server_factory(settings, engine=load_engine(settings))
    long = {"model": server.model, "prompt": "a", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", COMPLETIONS, json=long) as running:  # takes the only slot
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(lines)
            with client.stream("POST", COMPLETIONS, json=long) as queued:  # fills the queue
                assert queued.status_code == 200
                r = client.post(COMPLETIONS, json={**long, "stream": False})
                assert_error(r, 429, code="rate_limit_exceeded")
                assert int(r.headers["retry-after"]) >= 1
                r = client.post(CHAT, json={"model": server.model, "messages": OK_CHAT, "max_tokens": 2})
                assert_error(r, 429)
    wait_for_idle(server)  # both closed streams were cancelled and their slot freed
    assert make_client(server).completions.create(model=server.model, prompt="x", max_tokens=2).usage


def test_more_choices_than_the_queue_holds_is_400_not_429(tiny_checkpoint, server_factory):
    server = server_factory(tiny_settings(tiny_checkpoint, max_queue=4))
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": ["a", "b"], "n": 3, "max_tokens": 2})
    assert_error(r, 400, param="n")


def test_draining_server_is_not_ready_and_refuses_work(tiny_checkpoint, server_factory):
    settings = tiny_settings(tiny_checkpoint, drain_grace=1.0)
    server = server_factory(settings, engine=load_engine(settings))
    assert httpx.get(server.url + "/ready").status_code == 200
    server.run(drain(server.app))
    assert_error(httpx.get(server.url + "/ready"), 503, code="shutting_down")
    assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}), 503)
    assert httpx.get(server.url + "/health").status_code == 200


def test_internal_errors_are_500_error_objects_and_counted(tiny_checkpoint, server_factory, monkeypatch):
    settings = tiny_settings(tiny_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))

    def broken_submit(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.engine, "submit", broken_submit)
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
    err = assert_error(r, 500)
    assert err["type"] == "server_error" and "secret internal detail" not in err["message"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'gptserve_requests_total{endpoint="/v1/completions",status="500"} 1.0' in metrics


def test_a_failing_forward_is_a_500_or_an_error_event_and_frees_the_slot(
    tiny_checkpoint, server_factory, monkeypatch
):
    settings = tiny_settings(tiny_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))

    def broken_step(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(server.engine.model, "step", broken_step)
    body = {"prompt": "x", "max_tokens": 5}
    assert_error(httpx.post(server.url + COMPLETIONS, json=body), 500)
    with httpx.stream(
        "POST", server.url + CHAT, json={"messages": OK_CHAT, "max_tokens": 5, "stream": True}
    ) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and '"server_error"' in events[-2]
    with pytest.raises(openai.APIError):
        list(make_client(server).completions.create(model=server.model, stream=True, **body))
    wait_for_idle(server)
