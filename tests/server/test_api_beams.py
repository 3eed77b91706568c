"""Beam search over HTTP (`num_beams`, `length_penalty`): the n best beams are the choices, equal
to the library's `gpt.beam_search` on the same weights, for both model kinds; it runs beside
streamed requests without disturbing them, and what cannot work is a 400 before any work."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TINY_CONTEXT, save_tiny, start_live_server, tiny_settings
from test_api_errors import CHAT, COMPLETIONS, assert_error

import gpt
from server.app import load_engine
from server.engine import Engine

TOK = gpt.get_tokenizer("byte")
PROMPT = "The quick brown fox"
# bytes >= 128 alone decode to U+FFFD, so distinct beams could read alike: keep the output ASCII
ASCII = {t: -100.0 for t in range(128, TOK.vocab_size)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-beams", seed=3, block_size=TINY_CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    settings = tiny_settings(checkpoint, max_batch_size=4, max_queue=16)
    s = start_live_server(settings, engine=load_engine(settings))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, _ = gpt.load(checkpoint)
    return model


def _post(server, path, body):
    body = {"model": server.model, "logit_bias": {str(t): b for t, b in ASCII.items()}, **body}
    return httpx.post(server.url + path, json=body, timeout=60)


def _library(model, prompt_ids, **params):
    return gpt.beam_search(model, TOK, prompt_ids, gpt.SamplingParams(logit_bias=ASCII, **params))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_completion_choices_are_the_library_s_best_beams_in_order(server, reference, length_penalty):
    params = dict(max_new_tokens=12, num_beams=4, length_penalty=length_penalty, repetition_penalty=1.3)
    want = _library(reference, TOK.encode(PROMPT), **params)
    r = _post(
        server,
        COMPLETIONS,
        {
            "prompt": PROMPT,
            "max_tokens": 12,
            "num_beams": 4,
            "n": 3,
            "length_penalty": length_penalty,
            "repetition_penalty": 1.3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [p.text for p in want[:3]]
    assert [c["finish_reason"] for c in body["choices"]] == [p.finish_reason for p in want[:3]]
    assert len({c["text"] for c in body["choices"]}) == 3  # distinct hypotheses, not one beam thrice
    assert body["usage"]["completion_tokens"] == sum(p.completion_tokens for p in want[:3])
    assert body["usage"]["prompt_tokens"] == len(TOK.encode(PROMPT))


def test_sampling_fields_do_not_change_a_beam_search(server):
    base = {"prompt": PROMPT, "max_tokens": 10, "num_beams": 3}
    plain = _post(server, COMPLETIONS, base).json()["choices"][0]["text"]
    noisy = _post(server, COMPLETIONS, {**base, "temperature": 1.5, "top_p": 0.5, "top_k": 3, "seed": 7})
    assert noisy.json()["choices"][0]["text"] == plain


def test_batched_prompts_each_get_their_own_beams(server, reference):
    prompts = ["abc", "hello there"]
    r = _post(server, COMPLETIONS, {"prompt": prompts, "max_tokens": 8, "num_beams": 2, "n": 2})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    want = [
        p.text for q in prompts for p in _library(reference, TOK.encode(q), max_new_tokens=8, num_beams=2)
    ]
    assert texts == want


def test_echo_puts_the_prompt_in_front_of_each_beam(server):
    r = _post(server, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "num_beams": 2, "n": 2, "echo": True})
    plain = _post(server, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "num_beams": 2, "n": 2})
    assert [c["text"] for c in r.json()["choices"]] == [PROMPT + c["text"] for c in plain.json()["choices"]]


def test_chat_choices_are_beams_of_the_rendered_prompt(server, reference):
    messages = [{"role": "user", "content": "hi"}]
    r = _post(server, CHAT, {"messages": messages, "max_tokens": 10, "num_beams": 3, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and all(c["message"]["role"] == "assistant" for c in choices)
    # the same search through the completions endpoint, on the prompt the template renders
    rendered = server.app.state.chat_template.render([("user", "hi")])
    again = _post(
        server,
        COMPLETIONS,
        {
            "prompt": rendered,
            "max_tokens": 10,
            "num_beams": 3,
            "n": 2,
            "stop": list(server.app.state.chat_template.stop) or None,
        },
    )
    assert [c["message"]["content"] for c in choices] == [c["text"] for c in again.json()["choices"]]


def test_a_beam_search_runs_beside_streams_and_leaves_them_unchanged(server, reference):
    greedy = {"prompt": "Once upon", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    alone = _post(server, COMPLETIONS, greedy).json()["choices"][0]["text"]
    want = [p.text for p in _library(reference, TOK.encode(PROMPT), max_new_tokens=30, num_beams=4)]

    def beam():
        return _post(server, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 30, "num_beams": 4, "n": 4})

    def stream():
        with httpx.stream("POST", server.url + COMPLETIONS, json={**greedy, "stream": True}, timeout=60) as r:
            return "".join(line for line in r.iter_lines())

    with ThreadPoolExecutor(4) as pool:
        beams = [pool.submit(beam) for _ in range(2)]
        streams = [pool.submit(stream) for _ in range(2)]
        for f in beams:
            assert [c["text"] for c in f.result().json()["choices"]] == want
        for f in streams:
            assert "[DONE]" in f.result()
    assert _post(server, COMPLETIONS, greedy).json()["choices"][0]["text"] == alone
    stats = server.engine.stats()
    assert stats.waiting == 0 and stats.running == 0


def test_encoder_decoder_beams_match_the_library(tmp_path):
    path = save_tiny(tmp_path / "s2s", preset="seq2seq-tiny", seed=5)
    model, tok = gpt.load(path)
    want = gpt.beam_search(
        model,
        tok,
        tok.encode("2024-01-05"),
        gpt.SamplingParams(max_new_tokens=9, num_beams=3, logit_bias=ASCII),
    )
    settings = tiny_settings(path, max_batch_size=2)
    s = start_live_server(settings, engine=load_engine(settings))
    try:
        r = _post(s, COMPLETIONS, {"prompt": "2024-01-05", "max_tokens": 9, "num_beams": 3, "n": 3})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [p.text for p in want]
    finally:
        s.stop()


@pytest.mark.parametrize(
    "path,extra,param",
    [
        (COMPLETIONS, {"num_beams": 2, "stream": True}, "stream"),
        (CHAT, {"num_beams": 2, "stream": True}, "stream"),
        (COMPLETIONS, {"num_beams": 2, "n": 3}, "n"),
        (CHAT, {"num_beams": 2, "n": 3}, "n"),
        (COMPLETIONS, {"num_beams": 2, "logprobs": 1}, "logprobs"),
        (CHAT, {"num_beams": 2, "logprobs": True}, "logprobs"),
        (COMPLETIONS, {"length_penalty": 2.0}, "length_penalty"),
        (CHAT, {"length_penalty": 0.5}, "length_penalty"),
        (COMPLETIONS, {"num_beams": 2, "max_tokens": 0, "echo": True}, "max_tokens"),
    ],
)
def test_what_beam_search_cannot_do_is_a_400_naming_the_field(server, path, extra, param):
    body = {"prompt": PROMPT} if path == COMPLETIONS else {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(
        _post(server, path, {"max_tokens": 4, **body, **extra}), 400, param=param, code="invalid_combination"
    )


@pytest.mark.parametrize("value", [0, 17, 2.5, "4", True])
def test_num_beams_out_of_range_or_not_an_integer_is_a_400(server, value):
    assert_error(_post(server, COMPLETIONS, {"prompt": PROMPT, "num_beams": value}), 400, param="num_beams")


def test_a_prompt_that_leaves_no_room_is_a_400_before_any_search(server):
    r = _post(server, COMPLETIONS, {"prompt": "x" * TINY_CONTEXT, "num_beams": 2, "max_tokens": 4})
    assert_error(r, 400)


# --- the engine, driven directly ---------------------------------------------------------


async def _drain(handle) -> list:
    return [p async for p in handle]


def _engine_run(engine: Engine, coro):
    async def main():
        try:
            return await asyncio.wait_for(coro(engine), 60)
        finally:
            await engine.shutdown(grace=0)

    return asyncio.run(main())


def test_a_timed_out_search_returns_its_best_beams_so_far(tiny_gpt):
    engine = Engine(tiny_gpt, TOK, max_batch_size=2)
    step = tiny_gpt.step

    def slow(*a, **k):
        time.sleep(0.02)
        return step(*a, **k)

    tiny_gpt.step = slow

    async def go(e):
        handles = e.submit_beams(
            TOK.encode("ab"),
            gpt.SamplingParams(max_new_tokens=50, num_beams=2, ignore_eos=True),
            2,
            timeout=0.3,
        )
        return [await _drain(h) for h in handles]

    outs = _engine_run(engine, go)
    assert [len(o) for o in outs] == [1, 1]
    assert all(o[0].finish_reason == "timeout" for o in outs)
    assert 0 < outs[0][0].completion_tokens < 50


def test_cancelling_every_choice_ends_the_search_and_frees_the_queue(tiny_gpt):
    engine = Engine(tiny_gpt, TOK, max_batch_size=2, max_queue=1)

    async def go(e):
        params = gpt.SamplingParams(max_new_tokens=60, num_beams=3, ignore_eos=True)
        handles = e.submit_beams(TOK.encode("ab"), params, 2)
        for h in handles:
            h.cancel()
        outs = [await _drain(h) for h in handles]
        again = e.submit_beams(TOK.encode("ab"), gpt.SamplingParams(max_new_tokens=3, num_beams=2), 1)
        return outs, [p async for p in again[0]]

    outs, again = _engine_run(engine, go)
    assert all(o[-1].finish_reason == "cancelled" for o in outs)
    assert again[-1].finish_reason in ("stop", "length")
