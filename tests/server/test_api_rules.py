"""One owner per rule: each request rule is checked in one place, so every path that reaches it
(completions or chat, streamed or not, the library or HTTP) answers the same error: status,
message, param and code. The library's `gpt.RequestError` names its own fields; the server
reports it under the API's names (`RequestError.renamed`)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from conftest import tiny_settings
from test_api_errors import CHAT, COMPLETIONS

import gpt
from gpt.decoding import PromptLogprobs, SequenceDecoder, decode_tokens
from server.app import load_engine
from server.engine import Engine

TOK = gpt.get_tokenizer("byte")
MESSAGES = [{"role": "user", "content": "hi"}]


def error(server, path: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(server.url + path, json=body, timeout=60)
    return r.status_code, r.json()["error"]


def every_path(server, completion: dict, chat: dict | None = None) -> list[tuple[int, dict]]:
    """The error of the completion body and (when given) the chat body, streamed and not."""
    bodies = [(COMPLETIONS, {"prompt": "hi", **completion})]
    if chat is not None:
        bodies.append((CHAT, {"messages": MESSAGES, **chat}))
    return [error(server, p, {**b, "stream": s}) for p, b in bodies for s in (False, True)]


def library_error(**fields) -> gpt.RequestError:
    with pytest.raises(gpt.RequestError) as e:
        limits = gpt.ContextLimits(
            vocab_size=TOK.vocab_size, max_len=128, max_source_len=127, is_seq2seq=False
        )
        limits.check_params(gpt.SamplingParams(**fields))
    return e.value


def same(errors: list[tuple[int, dict]]) -> tuple[int, dict]:
    assert all(e == errors[0] for e in errors), errors
    return errors[0]


def test_the_logprobs_limit_is_one_rule_with_one_message(live_server):
    reason = "must be an integer in [0, 20], got 21"
    status, err = same(
        every_path(live_server, {"logprobs": 21}) + every_path(live_server, {"logprobs": 21, "echo": True})
    )
    assert status == 400 and err == {
        "message": f"logprobs: {reason}",
        "type": "invalid_request_error",
        "param": "logprobs",
        "code": "invalid_value",
    }
    chat = {"logprobs": True, "top_logprobs": 21}
    status, chat_err = same(every_path(live_server, chat, chat)[2:])
    assert status == 400 and chat_err == {
        **err,
        "message": f"top_logprobs: {reason}",
        "param": "top_logprobs",
    }
    assert str(library_error(logprobs=21)) == f"logprobs: {reason}"
    e = library_error(prompt_logprobs=21)
    assert (e.param, e.reason) == ("prompt_logprobs", reason)


def test_prompt_logprobs_need_a_decoder_only_model_said_once(tiny_s2s_checkpoint, server_factory):
    settings = tiny_settings(tiny_s2s_checkpoint, max_batch_size=2)
    s2s = server_factory(settings, engine=load_engine(settings))
    status, err = same(every_path(s2s, {"echo": True, "logprobs": 1}))
    assert status == 400 and (err["param"], err["code"]) == ("echo", "invalid_combination")

    async def submit():
        engine = Engine(s2s.engine.model, TOK)
        try:
            with pytest.raises(gpt.RequestError) as e:
                engine.submit([1, 2], gpt.SamplingParams(max_new_tokens=2, prompt_logprobs=1))
            return e.value
        finally:
            await engine.shutdown(1)

    e = asyncio.run(submit())
    assert (e.param, e.code) == ("prompt_logprobs", "invalid_combination")
    assert err["message"] == f"echo: {e.reason}" and "decoder-only" in e.reason


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"300": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"stop_token_ids": [1, 2, 3, 999]}, "stop_token_ids.3"),
        ({"top_k": 1000}, "top_k"),
    ],
)
def test_vocabulary_and_range_checks_are_the_librarys(live_server, fields, param):
    status, err = same(every_path(live_server, fields, fields))
    assert status == 400 and (err["param"], err["code"]) == (param, "invalid_value")
    library = {
        k: ({int(t): float(b) for t, b in v.items()} if k == "logit_bias" else v) for k, v in fields.items()
    }
    e = library_error(**library)
    assert err["message"] == str(e) and e.param == param


def test_empty_stop_strings_are_dropped_in_one_place(live_server):
    assert gpt.SamplingParams(stop=["", "x", "x"]).stop == ["x"]
    base = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for path, body, text in (
        (COMPLETIONS, {"prompt": "hi", **base}, lambda r: r["choices"][0]["text"]),
        (CHAT, {"messages": MESSAGES, **base}, lambda r: r["choices"][0]["message"]["content"]),
    ):
        plain = httpx.post(live_server.url + path, json=body, timeout=60).json()
        empty = httpx.post(live_server.url + path, json={**body, "stop": ["", ""]}, timeout=60).json()
        assert text(empty) == text(plain)


def test_n_at_most_num_beams_is_the_engines_rule(live_server):
    beams = {"num_beams": 2, "n": 3, "max_tokens": 3}
    status, err = same([e for e in every_path(live_server, beams, beams) if e[1]["param"] == "n"])
    assert status == 400 and err["code"] == "invalid_combination"

    async def submit():
        with pytest.raises(gpt.RequestError) as e:
            live_server.engine.submit_beams([1, 2], gpt.SamplingParams(max_new_tokens=3, num_beams=2), 3)
        return e.value

    assert err["message"] == str(live_server.run(submit()))


def test_streamed_beams_are_refused_before_n_is_looked_at(live_server):
    status, err = error(live_server, COMPLETIONS, {"prompt": "hi", "num_beams": 2, "n": 3, "stream": True})
    assert status == 400 and err["param"] == "stream"


def test_logits_are_cut_to_the_tokenizers_vocabulary_by_sampling_and_scoring_alike():
    V = TOK.vocab_size
    logits = torch.zeros(4, V + 7)
    logits[:, V:] = 100.0  # a padded output layer's ids, which the tokenizer lacks
    d = SequenceDecoder(TOK, [1, 2, 3, 4], gpt.SamplingParams(max_new_tokens=2, temperature=0, logprobs=3))
    (piece,) = decode_tokens(logits[:1], [d])
    assert piece.token_ids[0] < V and all(t < V for t in piece.top_logprobs[0])
    scored = PromptLogprobs([1, 2, 3, 4])
    scored.score(logits, 0, 3, V)
    assert all(t < V for alts in scored.top_logprobs[1:] for t in alts)
    assert scored.logprobs[1:] == pytest.approx([-torch.log(torch.tensor(float(V))).item()] * 3)


def test_cached_tokens_count_once_per_prompt_streamed_or_not(live_server):
    body = {"prompt": ["tell me a story", "tell me a story"], "n": 2, "max_tokens": 2, "temperature": 0}
    httpx.post(live_server.url + COMPLETIONS, json=body, timeout=60)  # the rows now hold the prompt
    whole = httpx.post(live_server.url + COMPLETIONS, json=body, timeout=60).json()["usage"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live_server.url + COMPLETIONS, json=stream, timeout=60) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = httpx.Response(200, content=chunks[-1][6:]).json()["usage"]
    cached = whole["prompt_tokens_details"]["cached_tokens"]
    assert streamed == whole and 0 < cached <= whole["prompt_tokens"]


def test_a_dead_engine_is_engine_dead_on_every_path(tiny_checkpoint, server_factory, monkeypatch):
    settings = tiny_settings(tiny_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))
    encode = server.engine.tokenizer.encode

    def dying_encode(text):  # dies after get_engine let the request in, before it is queued
        server.engine._die("RuntimeError: simulated")
        return encode(text)

    monkeypatch.setattr(server.engine.tokenizer, "encode", dying_encode)
    raced = error(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
    after = error(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
    ready = httpx.get(server.url + "/ready")
    status, err = same([raced, after, (ready.status_code, ready.json()["error"])])
    assert status == 503 and err["code"] == "engine_dead" and "simulated" in err["message"]
    gauges = [server.engine.metrics.value(f"gptserve_{g}") for g in ("requests_running", "kv_slots_used")]
    assert gauges == [0, 0]


def test_a_budget_of_zero_is_zero_everywhere(live_server):
    body = {"prompt": "hi", "max_tokens": 0, "echo": True}
    whole = httpx.post(live_server.url + COMPLETIONS, json=body, timeout=60).json()
    assert whole["choices"][0]["text"] == "hi" and whole["usage"]["completion_tokens"] == 0
    model = gpt.build_model(gpt.preset("gpt-tiny")).eval()
    (piece,) = gpt.complete(model, TOK, ["hi"], [gpt.SamplingParams(max_new_tokens=0)])
    assert (piece.text, piece.token_ids, piece.finish_reason) == ("", [], "length")
    status, err = error(live_server, COMPLETIONS, {**body, "num_beams": 2})  # beams are not streamed
    assert status == 400 and (err["param"], err["code"]) == ("max_tokens", "invalid_combination")
    e = library_error(max_new_tokens=0, num_beams=2)
    assert err["message"] == f"max_tokens: {e.reason}"
