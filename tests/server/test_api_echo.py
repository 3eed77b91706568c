"""/v1/completions with `echo`, prompt logprobs and `max_tokens: 0` (what lm-evaluation-harness's
`local-completions` backend sends to score text).

The served model is gpt-tiny with an output layer padded past the byte tokenizer's 257 ids, and
the padded ids made the most likely by far (their logits ~32, the real ones ~N(0, 2)): a server
that reported them, or normalised over them, would be far off. Its lm_head is untied and scaled up
so that distributions are peaked and top-N sets are not decided by rounding. The engine prefills
in chunks of 7 tokens with 4 slots, so prompts are scored across several forwards that they share
with other requests. Differential checks compare with a plain full forward pass of the same
checkpoint, loaded separately.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import TINY_CONTEXT, make_client, start_live_server, tiny_settings
from test_api_errors import CHAT, COMPLETIONS, OK_CHAT, assert_error

import gpt
from server.app import load_engine
from server.engine import Engine
from server.logprobs import token_text

TOK = gpt.get_tokenizer("byte")
VOCAB = TOK.vocab_size  # 257
PADDED_VOCAB = 320
TOL = 1e-4
NO_EOS = {"ignore_eos": True}
PROMPT = "The quick brown fox jumps over the lazy dog, twice."  # 51 tokens: 8 prefill chunks of 7
ASCII_ONLY = {str(t): -100 for t in range(128, VOCAB)}  # generated tokens are then chr(id), whole characters


def _build_padded(path) -> str:
    torch.manual_seed(11)
    model = gpt.build_model(
        gpt.preset("gpt-tiny", block_size=TINY_CONTEXT, vocab_size=PADDED_VOCAB, tie_embeddings=False)
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        # final LayerNorm output = gain * normalised + bias, and the normalised part sums to 0: a padded
        # row of ones reads sum(bias) = 32 for every position, far above any real token's logit
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[VOCAB:] = 1.0
    gpt.save(model.eval(), path)
    return str(path)


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory) -> str:
    return _build_padded(tmp_path_factory.mktemp("ckpt") / "tiny-padded")


@pytest.fixture(scope="module")
def reference(padded_checkpoint):
    model, _ = gpt.load(padded_checkpoint)
    return model


@pytest.fixture(scope="module")
def server(padded_checkpoint):
    model, tokenizer = gpt.load(padded_checkpoint)
    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=64, prefill_chunk=7)
    srv = start_live_server(tiny_settings(padded_checkpoint, max_batch_size=4, max_queue=64), engine=engine)
    yield srv
    srv.stop()


def post(server, body: dict, path: str = COMPLETIONS) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": server.model, **body}, timeout=60)


def ok(server, body: dict) -> dict:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward pass over the tokenizer's ids: row k is the distribution of
    token k + 1."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0, :, :VOCAB].float()
    return torch.log_softmax(logits, dim=-1)


def assert_prompt_part(lp: dict, ids: list[int], ref: torch.Tensor, top_n: int) -> None:
    """The first len(ids) entries of a choice's logprobs against the reference distributions."""
    n = len(ids)
    assert lp["tokens"][:n] == [token_text(TOK, t) for t in ids]
    assert lp["token_logprobs"][0] is None
    for k in range(1, n):
        assert lp["token_logprobs"][k] == pytest.approx(ref[k - 1, ids[k]].item(), abs=TOL), k
    if not top_n:
        assert lp["top_logprobs"] is None
        return
    assert lp["top_logprobs"][0] is None
    for k in range(1, n):
        vals, idx = ref[k - 1].topk(top_n)
        want = {token_text(TOK, t): v for t, v in zip(idx.tolist(), vals.tolist())}
        got = lp["top_logprobs"][k]
        assert set(got) == set(want), k
        assert all(got[t] == pytest.approx(want[t], abs=TOL) for t in want), k


def assert_offsets(lp: dict, text: str) -> None:
    """Each token's text_offset is where its text starts in the choice's text (for tokens that are
    whole characters, in text that is valid UTF-8), and offsets never decrease."""
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and len(offsets) == len(lp["tokens"])
    for token, off in zip(lp["tokens"], offsets):
        if token != "\ufffd":
            assert text[off : off + len(token)] == token


def test_prompt_logprobs_equal_a_plain_forward_pass_and_skip_the_padded_ids(server, reference):
    ids = TOK.encode(PROMPT)
    ref = reference_logprobs(reference, ids)
    for top_n in (5, 0, 1):
        r = ok(server, {"prompt": PROMPT, "echo": True, "logprobs": top_n, "max_tokens": 0})
        (choice,) = r["choices"]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids)
        assert_prompt_part(lp, ids, ref, top_n)
        assert lp["text_offset"] == list(range(len(ids)))  # one byte, one character each
        assert_offsets(lp, choice["text"])
        assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 0


def test_echo_prepends_the_prompt_and_leaves_the_completion_as_without_echo(server, reference):
    ids = TOK.encode(PROMPT)
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        body = {
            "prompt": PROMPT,
            "max_tokens": 8,
            "logprobs": 3,
            "logit_bias": ASCII_ONLY,
            **sampling,
            **NO_EOS,
        }
        plain = ok(server, body)["choices"][0]  # first: this prompt is then in the prefix cache
        echoed = ok(server, {**body, "echo": True})["choices"][0]
        assert echoed["text"] == PROMPT + plain["text"]
        assert echoed["finish_reason"] == plain["finish_reason"] == "length"
        lp, gen = echoed["logprobs"], plain["logprobs"]
        n = len(ids)
        assert lp["tokens"][n:] == gen["tokens"]
        assert lp["token_logprobs"][n:] == pytest.approx(gen["token_logprobs"], abs=1e-5)
        assert [set(d) for d in lp["top_logprobs"][n:]] == [set(d) for d in gen["top_logprobs"]]
        assert lp["text_offset"][n:] == [len(PROMPT) + o for o in gen["text_offset"]]
        assert_prompt_part(lp, ids, reference_logprobs(reference, ids), 3)  # scored in full, cache or not
        assert_offsets(lp, echoed["text"])


def test_scoring_a_generated_text_gives_back_its_generation_logprobs(server):
    """The prompt logprobs and the generated tokens' logprobs come from the same model, dtype and
    vocabulary handling: echoing prompt + completion with max_tokens 0 scores the completion's
    tokens as they were generated."""
    gen = ok(
        server,
        {
            "prompt": PROMPT,
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": 2,
            "logit_bias": ASCII_ONLY,
            **NO_EOS,
        },
    )["choices"][0]["logprobs"]
    ids = TOK.encode(PROMPT) + [ord(t) for t in gen["tokens"]]
    scored = ok(server, {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0})["choices"][0][
        "logprobs"
    ]
    n = len(TOK.encode(PROMPT))
    assert scored["tokens"][n:] == gen["tokens"]
    assert scored["token_logprobs"][n:] == pytest.approx(gen["token_logprobs"], abs=TOL)
    assert [set(d) for d in scored["top_logprobs"][n:]] == [set(d) for d in gen["top_logprobs"]]


def test_max_tokens_0_needs_echo(server):
    err = assert_error(
        post(server, {"prompt": "x", "max_tokens": 0}), 400, param="max_tokens", code="invalid_combination"
    )
    assert err["type"] == "invalid_request_error" and "echo" in err["message"]
    assert_error(post(server, {"prompt": "x", "max_tokens": 0, "echo": False}), 400, param="max_tokens")
    assert_error(post(server, {"messages": OK_CHAT, "max_tokens": 0}, CHAT), 400, param="max_tokens")
    assert_error(post(server, {"messages": OK_CHAT, "echo": True}, CHAT), 400, param="echo")
    assert_error(post(server, {"prompt": "x", "echo": "yes"}), 400, param="echo")
    assert_error(
        post(server, {"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 1}),
        400,
        param="min_tokens",
        code="invalid_combination",
    )


def test_max_tokens_0_with_echo_and_no_logprobs_returns_the_prompt(server):
    r = ok(server, {"prompt": ["one", "two"], "echo": True, "max_tokens": 0, "n": 2})
    assert [c["text"] for c in r["choices"]] == ["one", "one", "two", "two"]
    assert all(c["logprobs"] is None and c["finish_reason"] == "length" for c in r["choices"])
    assert r["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 0,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
            "reasoning_tokens": 0,
        },
    }
    assert server.engine.stats().slots_in_use == 0


def test_the_prompt_must_fit_the_context(server):
    fits = "x" * (TINY_CONTEXT - 1)
    r = ok(server, {"prompt": fits, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert len(r["choices"][0]["logprobs"]["tokens"]) == TINY_CONTEXT - 1
    assert_error(
        post(server, {"prompt": "x" * TINY_CONTEXT, "echo": True, "logprobs": 0, "max_tokens": 0}),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    assert_error(
        post(server, {"prompt": fits, "echo": True, "logprobs": 0, "max_tokens": 2}),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )


def _stream(server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream(
        "POST", server.url + COMPLETIONS, json={"model": server.model, "stream": True, **body}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def _join(chunks: list[dict]) -> dict[int, dict]:
    """Per choice index: joined text, joined logprobs, finish reasons, and its chunks' texts."""
    out: dict[int, dict] = {}
    for ch in chunks:
        for c in ch["choices"]:
            o = out.setdefault(
                c["index"],
                {
                    "text": "",
                    "reasons": [],
                    "texts": [],
                    "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
                },
            )
            o["text"] += c["text"]
            o["texts"].append(c["text"])
            if c["finish_reason"] is not None:
                o["reasons"].append(c["finish_reason"])
            if c["logprobs"] is not None:
                for k in o["logprobs"]:
                    o["logprobs"][k] += c["logprobs"][k] or []
    return out


def test_streamed_echo_sends_each_choices_prompt_first_and_joins_to_the_whole_response(server, reference):
    ids = TOK.encode(PROMPT)
    body = {
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 2,
        "max_tokens": 6,
        "n": 2,
        "temperature": 1.0,
        "seed": 3,
        **NO_EOS,
    }
    whole = ok(server, body)
    chunks = _stream(server, {**body, "stream_options": {"include_usage": True}})
    joined = _join(chunks)
    assert sorted(joined) == [0, 1]
    for i, choice in enumerate(whole["choices"]):
        j = joined[i]
        assert j["texts"][0] == PROMPT  # the first chunk of each choice is its prompt
        assert j["text"] == choice["text"] and choice["text"].startswith(PROMPT)
        assert j["reasons"] == ["length"]
        assert j["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert j["logprobs"]["text_offset"] == choice["logprobs"]["text_offset"]
        assert j["logprobs"]["token_logprobs"][0] is None
        assert j["logprobs"]["token_logprobs"][1:] == pytest.approx(
            choice["logprobs"]["token_logprobs"][1:], abs=1e-5
        )
        assert_prompt_part(j["logprobs"], ids, reference_logprobs(reference, ids), 2)
    first = next(c for ch in chunks for c in ch["choices"] if c["index"] == 0)
    assert first["logprobs"]["tokens"] == [token_text(TOK, t) for t in ids] and first["finish_reason"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-1]["usage"]["prompt_tokens"] == len(ids)
    # nothing generated: the prompt chunk, then the finish
    scored = _join(_stream(server, {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0}))
    assert scored[0]["texts"] == [PROMPT, ""] and scored[0]["reasons"] == ["length"]
    assert len(scored[0]["logprobs"]["tokens"]) == len(ids)


def test_token_id_prompts_echo_as_their_decoded_text(server, reference):
    text = "naïve café"  # 2-byte characters: tokens that hold half a character
    ids = TOK.encode(text)
    by_text = ok(server, {"prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0})["choices"][0]
    by_ids = ok(server, {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0})["choices"][0]
    assert by_ids["text"] == by_text["text"] == text
    assert by_ids["logprobs"]["tokens"] == by_text["logprobs"]["tokens"]
    assert by_ids["logprobs"]["token_logprobs"][1:] == pytest.approx(
        by_text["logprobs"]["token_logprobs"][1:], abs=1e-5
    )
    assert_prompt_part(by_ids["logprobs"], ids, reference_logprobs(reference, ids), 2)
    # a character's bytes all point at it: the offset counts the whole characters before the token
    assert by_ids["logprobs"]["text_offset"] == [
        len(bytes(ids[:k]).decode("utf-8", errors="ignore")) for k in range(len(ids))
    ]
    assert_offsets(by_ids["logprobs"], by_ids["text"])
    # ids that are not valid UTF-8 echo as the decoder shows them, with U+FFFD
    broken = [104, 195, 105]
    r = ok(server, {"prompt": broken, "echo": True, "max_tokens": 2, "temperature": 0, **NO_EOS})["choices"][
        0
    ]
    assert r["text"].startswith(TOK.decode(broken)) and "\ufffd" in r["text"]


def test_a_batch_of_prompts_each_echo_their_own_and_equal_them_alone(server, reference):
    for prompts in (
        ["a b c", "hello world", "x", PROMPT],
        [TOK.encode("token ids"), TOK.encode("y"), [7, 8]],
    ):
        r = ok(server, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0})
        assert [c["index"] for c in r["choices"]] == list(range(len(prompts)))
        all_ids = [p if isinstance(p, list) else TOK.encode(p) for p in prompts]
        for ids, choice in zip(all_ids, r["choices"]):
            assert choice["text"] == TOK.decode(ids)
            assert_prompt_part(choice["logprobs"], ids, reference_logprobs(reference, ids), 1)
        one_token = next(c for ids, c in zip(all_ids, r["choices"]) if len(ids) == 1)
        assert one_token["logprobs"]["token_logprobs"] == [None]  # nothing to score
        assert r["usage"]["prompt_tokens"] == sum(map(len, all_ids))


def test_concurrent_requests_with_and_without_echo_equal_their_solo_results(server):
    jobs = []
    for i in range(12):
        prompt = f"{i} " + PROMPT[: 10 + 3 * i]
        if i % 3 == 0:
            jobs.append({"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0})
        elif i % 3 == 1:
            jobs.append(
                {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0, **NO_EOS}
            )
        else:
            jobs.append(
                {"prompt": prompt, "logprobs": 1, "max_tokens": 9, "temperature": 0.8, "seed": i, **NO_EOS}
            )
    solo = [ok(server, body)["choices"][0] for body in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda body: ok(server, body)["choices"][0], jobs))
    for a, b in zip(solo, together):
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        first, first_together = a["logprobs"]["token_logprobs"][0], b["logprobs"]["token_logprobs"][0]
        assert (first is None) == (first_together is None)  # null for an echoed prompt's first token
        # a batch's rows and a lone row multiply through different kernels: equal within rounding
        assert first is None or first_together == pytest.approx(first, abs=1e-5)
        rest = [x for x in a["logprobs"]["token_logprobs"] if x is not None]
        assert [x for x in b["logprobs"]["token_logprobs"] if x is not None] == pytest.approx(rest, abs=1e-5)
    assert server.engine.stats().slots_in_use == 0


def test_the_openai_client_scores_a_prompt(server):
    client = make_client(server)
    r = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    (choice,) = r.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(TOK.encode(PROMPT))
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    # what lm-evaluation-harness's local-completions sends: one generated token after the prompt
    r = client.completions.create(
        model=server.model,
        prompt=[TOK.encode(PROMPT)],
        echo=True,
        logprobs=1,
        max_tokens=1,
        temperature=0,
        seed=1234,
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(TOK.encode(PROMPT)) + 1
    greedy = all(tok == max(top.values()) for tok, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert isinstance(greedy, bool)  # is_greedy as lm-eval computes it: every entry past the first is a dict
    stream = client.completions.create(
        model=server.model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == PROMPT


def test_an_encoder_decoder_echoes_its_source_but_cannot_score_it(tiny_s2s_checkpoint, server_factory):
    settings = tiny_settings(tiny_s2s_checkpoint, max_batch_size=2)
    s2s = server_factory(settings, engine=load_engine(settings))
    assert_error(
        post(s2s, {"prompt": "abc", "echo": True, "logprobs": 1}),
        400,
        param="echo",
        code="invalid_combination",
    )
    r = ok(s2s, {"prompt": "abc", "echo": True, "max_tokens": 3, "temperature": 0, **NO_EOS})
    assert r["choices"][0]["text"].startswith("abc") and r["usage"]["completion_tokens"] == 3
    r = ok(s2s, {"prompt": "abc", "echo": True, "max_tokens": 0})
    assert r["choices"][0]["text"] == "abc"
