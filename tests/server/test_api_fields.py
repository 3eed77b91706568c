"""Request fields: the cheap output-changing extensions work (min_tokens, stop_token_ids), the
ones not implemented are refused naming the field, the size limits hold before any work is
done, and no logprob can make a response invalid JSON."""

import json
import threading

import httpx
import pytest
from conftest import tiny_settings
from test_api_errors import CHAT, COMPLETIONS, OK_CHAT, assert_error, wait_for_idle

from server.app import load_engine
from server.params import INLINE_TEXT
from server.protocol import MAX_LOGIT_BIAS, MAX_STOP_CHARS

BYTE_EOT = 256  # the byte tokenizer's end-of-text id


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=30)


@pytest.mark.parametrize(
    "field, value",
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("typical_p", 0.5),
        ("use_beam_search", True),
        ("prompt_logprobs", 1),
        ("include_stop_str_in_output", True),
        ("truncate_prompt_tokens", 10),
        ("reasoning_effort", "high"),
    ],
)
@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_unimplemented_output_changing_fields_are_400_naming_the_field(live_server, endpoint, field, value):
    body = {"prompt": "x", "messages": OK_CHAT, "max_tokens": 1, field: value}
    err = assert_error(_post(live_server, endpoint, body), 400, param=field)
    assert "not" in err["message"] and err["code"] in ("unsupported_parameter", "invalid_value")


def test_tools_on_the_completions_endpoint_are_400s(live_server):
    tools = [{"type": "function", "function": {"name": "f"}}]
    for field, value in (("tools", tools), ("tool_choice", "required")):
        body = {"prompt": "x", "max_tokens": 1, field: value}
        err = assert_error(_post(live_server, COMPLETIONS, body), 400, param=field)
        assert "chat" in err["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "text"}},
        {"tools": []},
        {"tool_choice": "none"},
        {"typical_p": 1.0},
        {
            "user": "u1",
            "metadata": {"k": "v"},
            "store": False,
            "service_tier": "auto",
            "parallel_tool_calls": False,
        },
        {"num_beams": 1, "length_penalty": 1.0, "modalities": ["text"]},
    ],
)
def test_the_off_values_of_those_fields_and_output_neutral_fields_are_accepted(live_server, extra):
    for endpoint in (COMPLETIONS, CHAT):
        r = _post(live_server, endpoint, {"prompt": "x", "messages": OK_CHAT, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text


def test_chat_refuses_echo_and_best_of(live_server):
    assert_error(_post(live_server, CHAT, {"messages": OK_CHAT, "echo": True}), 400, param="echo")
    assert_error(_post(live_server, CHAT, {"messages": OK_CHAT, "best_of": 2}), 400, param="best_of")


def test_stream_options_without_stream_is_400(live_server):
    for endpoint in (COMPLETIONS, CHAT):
        body = {"prompt": "x", "messages": OK_CHAT, "stream_options": {"include_usage": True}}
        assert_error(_post(live_server, endpoint, body), 400, param="stream_options")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "s" * (MAX_STOP_CHARS + 1)}, "stop"),
        ({"stop": ["ok", "s" * (MAX_STOP_CHARS + 1)]}, "stop"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
        ({"stop_token_ids": [BYTE_EOT + 1]}, "stop_token_ids.0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {"257": 5}}, "logit_bias"),  # past the byte tokenizer
    ],
)
def test_size_limits_and_token_ids_are_400_naming_the_field(live_server, body, param):
    for endpoint in (COMPLETIONS, CHAT):
        r = _post(live_server, endpoint, {"prompt": "x", "messages": OK_CHAT, "max_tokens": 4, **body})
        assert_error(r, 400, param=param)


def test_min_tokens_holds_back_end_of_text(live_server):
    body = {"prompt": "x", "max_tokens": 20, "temperature": 0, "logit_bias": {str(BYTE_EOT): 100}}
    eager = _post(live_server, COMPLETIONS, body).json()
    assert eager["usage"]["completion_tokens"] == 1 and eager["choices"][0]["finish_reason"] == "stop"
    held = _post(live_server, COMPLETIONS, {**body, "min_tokens": 5}).json()
    assert held["usage"]["completion_tokens"] == 6  # five tokens, then end-of-text
    assert held["choices"][0]["finish_reason"] == "stop" and len(held["choices"][0]["text"].encode()) <= 5


def test_a_stop_token_id_ends_the_output_without_showing_it(live_server):
    body = {"prompt": "x", "max_tokens": 20, "temperature": 0, "logit_bias": {str(ord("A")): 100}}
    r = _post(live_server, COMPLETIONS, {**body, "stop_token_ids": [ord("A")]}).json()
    assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 1
    r = _post(
        live_server, CHAT, {"messages": OK_CHAT, **body, "stop_token_ids": [ord("A")], "min_tokens": 3}
    ).json()
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "stop"


def test_a_request_with_more_generations_than_the_queue_is_refused_before_tokenizing(
    live_server, monkeypatch
):
    calls = []
    encode = live_server.engine.tokenizer.encode
    monkeypatch.setattr(
        live_server.engine.tokenizer, "encode", lambda text: calls.append(text) or encode(text)
    )
    r = _post(live_server, COMPLETIONS, {"prompt": ["abc"] * 1000, "n": 64, "max_tokens": 1})
    assert_error(r, 400, param="n")
    assert calls == []


def test_tokenizing_a_large_prompt_does_not_hold_the_event_loop(live_server, monkeypatch):
    encode = live_server.engine.tokenizer.encode
    entered, health_answered = threading.Event(), threading.Event()

    def blocking_encode(text):  # stands for a large body's encoding: it ends only after /health answered
        entered.set()
        health_answered.wait(20)
        return encode(text)

    monkeypatch.setattr(live_server.engine.tokenizer, "encode", blocking_encode)
    large = "x" * (INLINE_TEXT + 1)  # smaller prompts are tokenized on the loop: quicker than a hop
    slow = threading.Thread(target=_post, args=(live_server, COMPLETIONS, {"prompt": large, "max_tokens": 1}))
    slow.start()
    assert entered.wait(20)
    try:  # on the event loop, encoding would block this until the wait above gives up
        assert httpx.get(live_server.url + "/health", timeout=10).status_code == 200
    finally:
        health_answered.set()
        slow.join()


def test_non_finite_logprobs_are_sent_as_numbers(tiny_checkpoint, server_factory, monkeypatch):
    settings = tiny_settings(tiny_checkpoint, prefix_cache=False)
    server = server_factory(settings, engine=load_engine(settings))
    step = server.engine.model.step

    def overflowing_step(*args, **kwargs):
        logits = step(*args, **kwargs).clone()
        logits[..., 5] = float("nan")
        logits[..., 6] = float("-inf")
        return logits

    monkeypatch.setattr(server.engine.model, "step", overflowing_step)
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 5, "logit_bias": {"5": 100}}
    r = _post(server, COMPLETIONS, body)
    assert r.status_code == 200
    logprobs = json.loads(r.text, parse_constant=pytest.fail)["choices"][0]["logprobs"]
    assert all(isinstance(x, float) for x in logprobs["token_logprobs"])
    with httpx.stream(
        "POST",
        server.url + CHAT,
        json={"messages": OK_CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 5, "stream": True},
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                json.loads(line[6:], parse_constant=pytest.fail)
    wait_for_idle(server)
