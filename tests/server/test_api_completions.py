"""/v1/completions through the official openai client against a live server."""

import httpx
import pytest
from conftest import TINY_CONTEXT

import gpt

TOK = gpt.get_tokenizer("byte")  # the tiny checkpoint's tokenizer
NO_EOS = {"ignore_eos": True}


def complete(client, model, **kw):
    return client.completions.create(model=model, **kw)


def stream_text(client, model, **kw):
    """(joined text per choice index, finish reasons per index, all chunks)"""
    chunks = list(client.completions.create(model=model, stream=True, **kw))
    texts, reasons = {}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return texts, reasons, chunks


def test_non_streamed_completion_has_exact_usage_and_length_finish(openai_client, live_server):
    prompt = "Hello, world"
    r = complete(
        openai_client, live_server.model, prompt=prompt, max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    assert r.object == "text_completion" and r.model == live_server.model and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_stream_joins_to_the_non_streamed_text_for_the_same_seed(openai_client, live_server):
    kw = dict(prompt="Once upon a time", max_tokens=24, temperature=0.9, seed=123, extra_body=NO_EOS)
    whole = complete(openai_client, live_server.model, **kw).choices[0].text
    texts, reasons, chunks = stream_text(openai_client, live_server.model, **kw)
    assert texts == {0: whole}
    assert reasons == {0: ["length"]}  # exactly once
    assert all(ch.usage is None for ch in chunks)  # no include_usage, no usage


def test_different_seeds_give_different_samples(openai_client, live_server):
    kw = dict(prompt="abc", max_tokens=16, temperature=1.0, extra_body=NO_EOS)
    a = complete(openai_client, live_server.model, seed=1, **kw).choices[0].text
    b = complete(openai_client, live_server.model, seed=2, **kw).choices[0].text
    assert a != b


def test_n_choices_are_seeded_per_choice_and_ordered_by_prompt(openai_client, live_server):
    kw = dict(max_tokens=10, temperature=1.0, seed=7, extra_body=NO_EOS)
    r = complete(openai_client, live_server.model, prompt=["first", "second"], n=3, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    texts = [c.text for c in r.choices]
    assert len(set(texts[:3])) == 3  # choice i samples with seed + i
    # each choice reproduces alone: prompt p, choice i == n=1 with seed 7 + i
    for p, prompt in enumerate(["first", "second"]):
        for i in range(3):
            single = complete(openai_client, live_server.model, prompt=prompt, **{**kw, "seed": 7 + i})
            assert single.choices[0].text == texts[p * 3 + i]
    assert r.usage.prompt_tokens == len(TOK.encode("first")) + len(TOK.encode("second"))
    assert r.usage.completion_tokens == 6 * 10
    streamed, reasons, _ = stream_text(
        openai_client, live_server.model, prompt=["first", "second"], n=3, **kw
    )
    assert [streamed[i] for i in range(6)] == texts
    assert reasons == {i: ["length"] for i in range(6)}


def test_token_id_prompts_equal_their_text(openai_client, live_server):
    kw = dict(max_tokens=8, temperature=0, extra_body=NO_EOS)
    by_text = complete(openai_client, live_server.model, prompt="Hi there", **kw).choices[0].text
    ids = TOK.encode("Hi there")
    assert complete(openai_client, live_server.model, prompt=ids, **kw).choices[0].text == by_text
    both = complete(openai_client, live_server.model, prompt=[ids, ids], **kw)
    assert [c.text for c in both.choices] == [by_text, by_text]
    assert both.usage.prompt_tokens == 2 * len(ids)


def _clean_window(text: str, width: int, start: int = 4) -> int:
    """Index of the first occurrence of a `width`-character substring (no U+FFFD) that starts
    at `start` or later."""
    for i in range(start, len(text) - width):
        s = text[i : i + width]
        if "\ufffd" not in s:
            return text.find(s)
    raise AssertionError(f"no clean window in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens_cuts_the_text_before_it(openai_client, live_server, stream):
    # a sampled text: the random tiny model's greedy output is one repeated byte
    base = dict(prompt="The stop test", max_tokens=40, temperature=1.0, seed=1, extra_body=NO_EOS)
    full = complete(openai_client, live_server.model, **base).choices[0].text
    k = _clean_window(full, 3)
    stop = full[k : k + 3]
    assert len(TOK.encode(stop)) >= 3  # one byte token per byte: the match spans tokens
    if stream:
        texts, reasons, chunks = stream_text(
            openai_client, live_server.model, stop=[stop, "never-there"], **base
        )
        assert texts[0] == full[:k] and reasons == {0: ["stop"]}
        assert all(stop not in c.text for ch in chunks for c in ch.choices)
    else:
        r = complete(openai_client, live_server.model, stop=stop, **base)
        assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("include_usage", [None, False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_include_usage_matrix(openai_client, live_server, include_usage, n):
    kw = dict(prompt="usage", n=n, max_tokens=5, seed=3, extra_body=NO_EOS)
    if include_usage is not None:
        kw["stream_options"] = {"include_usage": include_usage}
    texts, reasons, chunks = stream_text(openai_client, live_server.model, **kw)
    assert sorted(texts) == list(range(n)) and reasons == {i: ["length"] for i in range(n)}
    if include_usage:
        *body, last = chunks
        assert last.choices == [] and last.usage.prompt_tokens == 5
        assert last.usage.completion_tokens == 5 * n and last.usage.total_tokens == 5 + 5 * n
        assert all(ch.usage is None and ch.choices for ch in body)
    else:
        assert all(ch.usage is None and ch.choices for ch in chunks)


def test_raw_stream_is_sse_ending_with_done(live_server):
    body = {
        "model": live_server.model,
        "prompt": "raw",
        "max_tokens": 6,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", live_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    assert '"usage": null' in events[0] and '"choices": []' in events[-2]


def test_logprobs_follow_the_legacy_format_and_count_every_token(openai_client, live_server):
    kw = dict(prompt="logprobs", max_tokens=8, temperature=0, logprobs=3, extra_body=NO_EOS)
    r = complete(openai_client, live_server.model, **kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the top token
    chunks = list(openai_client.completions.create(model=live_server.model, stream=True, **kw))
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)


def test_logit_bias_forces_a_token(openai_client, live_server):
    r = complete(
        openai_client,
        live_server.model,
        prompt="bias",
        max_tokens=6,
        temperature=1.0,
        seed=5,
        logit_bias={str(ord("z")): 100},
        extra_body=NO_EOS,
    )
    assert r.choices[0].text == "z" * 6


def test_extensions_and_user_are_accepted(openai_client, live_server):
    r = complete(
        openai_client,
        live_server.model,
        prompt="ext",
        max_tokens=6,
        seed=1,
        user="alice",
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.3, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 6
    greedy = complete(
        openai_client, live_server.model, prompt="ext", max_tokens=6, temperature=0, extra_body=NO_EOS
    )
    top1 = complete(
        openai_client,
        live_server.model,
        prompt="ext",
        max_tokens=6,
        temperature=1.0,
        seed=9,
        extra_body={"top_k": 1, "ignore_eos": True},
    )
    assert top1.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy: the extension is applied


def test_default_max_tokens_shrinks_to_the_room_left(openai_client, live_server):
    prompt = "x" * (TINY_CONTEXT - 4)
    r = complete(openai_client, live_server.model, prompt=prompt, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_end_of_text_stops_with_finish_stop_and_counts_as_a_token(openai_client, live_server, stream):
    kw = dict(model=live_server.model, prompt="x", max_tokens=5, logit_bias={str(TOK.eot_token): 100})
    if stream:
        chunks = list(
            openai_client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        )
        assert "".join(c.text for ch in chunks for c in ch.choices) == ""
        assert [c.finish_reason for ch in chunks for c in ch.choices] == ["stop"]
        assert chunks[-1].usage.completion_tokens == 1
    else:
        r = openai_client.completions.create(**kw)
        assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 1


def test_a_continued_prompt_reports_its_cached_tokens_in_usage_streamed_or_not(openai_client, live_server):
    m = live_server.engine.metrics
    hits = m.value("gptserve_prefix_cache_hits_total")
    first = "A conversation that goes on: "
    r = complete(
        openai_client, live_server.model, prompt=first, max_tokens=6, temperature=0, extra_body=NO_EOS
    )
    follow = first + r.choices[0].text + " and on"
    again = complete(
        openai_client, live_server.model, prompt=follow, max_tokens=4, temperature=0, extra_body=NO_EOS
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    # the row kept the first prompt and the replies fed back (all but the last, never fed)
    assert len(TOK.encode(first)) <= cached < again.usage.prompt_tokens
    _, _, chunks = stream_text(
        openai_client,
        live_server.model,
        prompt=follow,
        max_tokens=4,
        temperature=0,
        extra_body=NO_EOS,
        stream_options={"include_usage": True},
    )
    streamed = chunks[-1].usage
    assert streamed.prompt_tokens == again.usage.prompt_tokens
    assert streamed.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert m.value("gptserve_prefix_cache_hits_total") >= hits + 2
