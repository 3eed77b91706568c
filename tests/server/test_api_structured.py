"""Structured output over HTTP: response_format, structured_outputs, guided_*, tool calls,
allowed_token_ids and bad_words, on both endpoints, streamed and not, through the official
openai client where it has the feature."""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import pydantic
import pytest
from conftest import make_client, tiny_settings

from server.app import load_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def stream_chunks(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "constraint",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
        {"structured_outputs": {"json": SCHEMA}},
        {"guided_json": SCHEMA},
    ],
)
def test_json_schema_outputs_validate_on_both_endpoints_with_n(live_server, path, constraint):
    prompt = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    body = {**prompt, **constraint, "max_tokens": 60, "n": 3, "temperature": 1.0, "seed": 1}
    r = post(live_server, path, body)
    assert r.status_code == 200, r.text
    done = 0
    for c in r.json()["choices"]:
        text = c["text"] if "text" in c else c["message"]["content"]
        if c["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
            done += 1
    assert done >= 1


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_regex_and_choice_match_in_full(live_server, path):
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    for so, check in [
        ({"regex": r"[a-c]{2}-[0-9]{2,3}"}, lambda t: re.fullmatch(r"[a-c]{2}-[0-9]{2,3}", t)),
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ]:
        chunks = stream_chunks(live_server, path, {**base, "structured_outputs": so, "max_tokens": 20})
        text = "".join(
            c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
            for c in chunks
            if c["choices"]
        )
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert check(text), text


def test_openai_sdk_parse_returns_a_pydantic_object(live_server):
    client = make_client(live_server)
    done = 0
    for seed in range(4):
        out = client.chat.completions.parse(
            model=live_server.model,
            messages=[{"role": "user", "content": "who?"}],
            response_format=Person,
            max_tokens=40,
            seed=seed,
        )
        msg = out.choices[0].message
        if out.choices[0].finish_reason == "stop":
            assert isinstance(msg.parsed, Person)
            done += 1
    assert done >= 1


def test_named_tool_call_arguments_validate(live_server):
    client = make_client(live_server)
    out = client.chat.completions.create(
        model=live_server.model,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert choice.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_calls_name_a_tool_and_validate_streamed_too(live_server):
    client = make_client(live_server)
    kwargs = dict(
        model=live_server.model,
        messages=[{"role": "user", "content": "?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=90,
        temperature=0,
    )
    out = client.chat.completions.create(**kwargs)
    assert out.choices[0].finish_reason == "tool_calls"
    calls = out.choices[0].message.tool_calls
    assert len(calls) == 1
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(json.loads(calls[0].function.arguments), specs[calls[0].function.name])
    # streamed, the SDK's accumulated deltas give the same call
    streamed = {}
    reason = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for v in streamed.values()] == [
        (calls[0].function.name, json.loads(calls[0].function.arguments))
    ]


def test_streamed_named_tool_call_sends_argument_fragments(live_server):
    chunks = stream_chunks(
        live_server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "?"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 40,
        },
    )
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    args = "".join(c["function"]["arguments"] for c in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_max_tokens_cuts_a_valid_prefix_with_length(live_server):
    r = post(
        live_server,
        "/v1/completions",
        {"prompt": "x", "structured_outputs": {"json": SCHEMA}, "max_tokens": 3, "temperature": 0},
    )
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "length" and c["text"].startswith("{")


def test_allowed_token_ids_and_bad_words(live_server):
    tok = live_server.engine.tokenizer
    allowed = tok.encode("ab")
    r = post(live_server, "/v1/completions", {"prompt": "x", "allowed_token_ids": allowed, "max_tokens": 12})
    c = r.json()["choices"][0]
    assert set(c["text"]) <= {"a", "b"} and c["text"]
    r = post(
        live_server,
        "/v1/completions",
        {"prompt": "x", "allowed_token_ids": allowed, "bad_words": ["a"], "max_tokens": 12},
    )
    assert set(r.json()["choices"][0]["text"]) == {"b"}


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "invalid_constraint"),
        ({"guided_json": {"type": "frob"}}, "guided_json", "invalid_constraint"),
        (
            {"structured_outputs": {"grammar": "start: foo"}},
            "structured_outputs.grammar",
            "invalid_constraint",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
            "invalid_combination",
        ),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", None),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "invalid_combination"),
        ({"guided_regex": "a", "num_beams": 2}, "guided_regex", "invalid_combination"),
        ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos", "invalid_combination"),
        ({"allowed_token_ids": [10**7]}, "allowed_token_ids.0", "invalid_value"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
            "response_format.json_schema.json_schema.name",
            None,
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(live_server, body, param, code):
    r = post(live_server, "/v1/completions", {"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].startswith(param.split(".")[0]), err
    if code:
        assert err["code"] == code, err


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        ([WEATHER], "auto", "tool_choice"),
        ([WEATHER], None, "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (None, "required", "tool_choice"),
    ],
)
def test_tool_choices_that_cannot_be_honoured_are_400s(live_server, tools, choice, param):
    body = {"messages": [{"role": "user", "content": "?"}], "max_tokens": 4}
    if tools is not None:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    r = post(live_server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_choice_none_ignores_the_tools(live_server):
    body = {"messages": [{"role": "user", "content": "?"}], "max_tokens": 4, "tools": [WEATHER]}
    r = post(live_server, "/v1/chat/completions", {**body, "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_health_answers_while_a_slow_constraint_compiles_and_it_times_out(server_factory, tiny_checkpoint):
    settings = tiny_settings(tiny_checkpoint, constraint_timeout=0.05)
    server = server_factory(settings, engine=load_engine(settings))
    # thousands of properties with their own patterns: a schema that takes long to compile
    slow = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "string", "pattern": f"^[a-z]{{2,{i % 50 + 3}}}$"} for i in range(1500)
        },
    }
    result = {}

    def send():
        result["r"] = post(server, "/v1/completions", {"prompt": "x", "guided_json": slow, "max_tokens": 4})

    t = threading.Thread(target=send)
    t.start()
    # while it compiles, and after the 400 while the compile thread finishes on its own: a
    # compile that held the GIL or the event loop would time these out
    while t.is_alive():
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    t.join()
    for _ in range(5):
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "constraint_too_complex", r.text
    # the engine still serves
    ok = post(server, "/v1/completions", {"prompt": "x", "guided_regex": "ab", "max_tokens": 4})
    assert ok.json()["choices"][0]["text"] == "ab"


def test_metrics_count_constrained_requests_and_compile_time(live_server):
    post(live_server, "/v1/completions", {"prompt": "x", "guided_regex": "[0-9]{3}z", "max_tokens": 8})
    text = httpx.get(live_server.url + "/metrics").text
    assert re.search(r'gptserve_constrained_requests_total\{kind="regex"\} [1-9]', text)
    assert re.search(r"gptserve_constraint_compile_seconds_count [1-9]", text)


def test_a_conversation_carrying_tool_calls_and_results_is_rendered(live_server):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = post(live_server, "/tokenize", {"messages": messages})
    assert r.status_code == 200, r.text
    text = live_server.engine.tokenizer.decode(r.json()["tokens"])
    assert 'Assistant: [{"name":"get_weather","arguments":{"city":"Oslo","days":1}}]\nTool: sunny\n' in text
    client = make_client(live_server)
    out = client.chat.completions.create(
        model=live_server.model,
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=16,
    )
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_an_encoder_decoder_server_constrains_its_decoder(server_factory, tiny_s2s_checkpoint):
    settings = tiny_settings(tiny_s2s_checkpoint, max_batch_size=4)
    server = server_factory(settings, engine=load_engine(settings))
    free = {"prompt": "x", "max_tokens": 8, "temperature": 0}
    alone = post(server, "/v1/completions", free).json()["choices"][0]["text"]
    r = post(
        server, "/v1/completions", {"prompt": ["x", "y"], "n": 2, "max_tokens": 40, "guided_json": SCHEMA}
    )
    for c in r.json()["choices"]:
        if c["finish_reason"] == "stop":
            jsonschema.validate(json.loads(c["text"]), SCHEMA)
        else:
            assert c["text"].startswith("{")
    assert post(server, "/v1/completions", free).json()["choices"][0]["text"] == alone
