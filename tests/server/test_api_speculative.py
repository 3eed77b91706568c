"""OpenAI's Predicted Outputs (`prediction`) and speculative decoding through the API: the same
output as without them, the prediction's tokens counted in the usage, bad predictions a 400."""

import asyncio

import httpx
import pytest
from conftest import TINY_CONTEXT, make_client, save_tiny, start_live_server, tiny_settings

import gpt
from gpt import SamplingParams
from server.app import load_engine

TOK = gpt.get_tokenizer("byte")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """The tiny model served three times: speculating wherever there is a draft from prompt
    lookup or a prediction, with a draft model (another tiny model, one layer), and never."""
    draft = save_tiny(tmp_path_factory.mktemp("draft") / "draft", seed=5, n_layer=1, block_size=TINY_CONTEXT)
    out = {}
    for mode in ("ngram", "draft", "off"):
        settings = tiny_settings(
            tiny_checkpoint, speculative=mode, draft_model=draft if mode == "draft" else None
        )
        out[mode] = start_live_server(settings, engine=load_engine(settings))
    yield out
    for s in out.values():
        s.stop()


def test_a_prediction_changes_nothing_but_the_usage_in_completions_and_chat(servers):
    spec, plain = make_client(servers["ngram"]), make_client(servers["off"])
    model = servers["off"].model
    kw = dict(max_tokens=30, temperature=0.8, seed=11, logprobs=2, extra_body=NO_EOS)
    want = plain.completions.create(model=model, prompt="Once upon", **kw)
    text = want.choices[0].text
    for prediction, kept in ((text, True), (text[:10] + "XYZ" + text[13:], True), ("#" * 40, False)):
        body = {**kw, "extra_body": {**NO_EOS, "prediction": {"type": "content", "content": prediction}}}
        got = spec.completions.create(model=model, prompt="Once upon", **body)
        assert got.choices[0].text == text and got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(
            want.choices[0].logprobs.token_logprobs, abs=1e-5
        )
        details = got.usage.completion_tokens_details
        assert got.usage.completion_tokens == 30
        assert (details.accepted_prediction_tokens > 0) == kept
    # the server without speculation ignores a prediction, as documented, and says it took none
    ignored = plain.completions.create(
        model=model,
        prompt="Once upon",
        **{**kw, "extra_body": {**NO_EOS, "prediction": {"type": "content", "content": text}}},
    )
    assert ignored.choices[0].text == text
    assert ignored.usage.completion_tokens_details.accepted_prediction_tokens == 0

    messages = [{"role": "user", "content": "hi"}]
    chat_kw = dict(max_tokens=20, temperature=0, extra_body=NO_EOS)
    reply = (
        plain.chat.completions.create(model=model, messages=messages, **chat_kw).choices[0].message.content
    )
    parts = [{"type": "text", "text": reply[:5]}, {"type": "text", "text": reply[5:]}]
    for stream in (False, True):
        extra = {**NO_EOS, "prediction": {"type": "content", "content": parts}}
        if stream:
            chunks = list(
                spec.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    **{**chat_kw, "extra_body": extra},
                )
            )
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            r = spec.chat.completions.create(
                model=model, messages=messages, **{**chat_kw, "extra_body": extra}
            )
            got, usage = r.choices[0].message.content, r.usage
        assert got == reply
        assert usage.completion_tokens_details.accepted_prediction_tokens > 0


def test_n_choices_prefix_cache_hits_and_a_draft_model_give_what_the_server_without_speculation_gives(
    servers,
):
    prompt = "abcabcabc abcabc " * 3  # prompt lookup finds drafts; the second request hits the cache
    body = dict(prompt=[prompt, prompt + "x"], n=3, max_tokens=24, temperature=1.0, seed=3, **NO_EOS)
    got = [
        httpx.post(servers[m].url + COMPLETIONS, json=body, timeout=60).json()
        for m in ("ngram", "draft", "off")
    ]
    for g in got[:2]:
        assert [c["text"] for c in g["choices"]] == [c["text"] for c in got[2]["choices"]]
    draft = servers["draft"].engine._sched.spec.draft
    assert (
        sorted(draft.free) == list(range(len(draft.free))) == list(range(draft.cache.batch_size))
    )  # rows back
    again = httpx.post(servers["ngram"].url + COMPLETIONS, json=body, timeout=60).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in got[1]["choices"]]


def test_drafted_and_kept_tokens_are_counted_by_source(servers):
    url = servers["ngram"].url
    prediction = {"type": "content", "content": "abababababababab"}
    body = dict(prompt="ab", max_tokens=16, temperature=0, prediction=prediction, **NO_EOS)
    usage = httpx.post(url + COMPLETIONS, json=body, timeout=60).json()["usage"]["completion_tokens_details"]
    drafted = usage["accepted_prediction_tokens"] + usage["rejected_prediction_tokens"]
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in httpx.get(url + "/metrics").text.splitlines()
        if line.startswith("gptserve_spec_")
    }
    assert drafted > 0
    assert metrics['gptserve_spec_draft_tokens_total{source="prediction"}'] >= drafted
    kept = metrics['gptserve_spec_accepted_tokens_total{source="prediction"}']
    assert kept >= usage["accepted_prediction_tokens"]


@pytest.mark.parametrize(
    "prediction,param,code",
    [
        ({"type": "content", "content": "x" * (TINY_CONTEXT + 1)}, "prediction", "context_length_exceeded"),
        ({"type": "text", "content": "x"}, "prediction.type", None),
        ({"type": "content", "content": 5}, None, None),
        ("just text", "prediction", None),
    ],
)
def test_bad_predictions_are_400s_naming_the_field(servers, prediction, param, code):
    r = httpx.post(
        servers["ngram"].url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "prediction": prediction}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param
    else:
        assert err["param"].startswith("prediction")
    if code is not None:
        assert err["code"] == code


def test_a_prediction_with_beam_search_is_a_400(servers):
    body = {
        "prompt": "x",
        "max_tokens": 4,
        "num_beams": 2,
        "prediction": {"type": "content", "content": "ab"},
    }
    r = httpx.post(servers["ngram"].url + COMPLETIONS, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"
    assert r.json()["error"]["code"] == "invalid_combination"


def test_cancelling_a_speculating_request_frees_its_slot_and_leaves_the_others_exact(servers):
    server = servers["ngram"]
    engine = server.engine
    params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    want = gpt.complete(engine.model, TOK, ["zzzz"], params, speculative="off")[0]
    predicted = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True, prediction=want.token_ids)

    async def main():
        doomed = engine.submit(TOK.encode("zzzz"), predicted)
        kept = engine.submit(TOK.encode("zzzz"), predicted)
        first = await doomed.__anext__()
        doomed.cancel()
        pieces = [p async for p in kept]
        # on a busy machine every step may have run before the first read: then that piece,
        # all of them merged, already ends the request
        rest = [p async for p in doomed]
        return pieces, [first, *rest]

    pieces, rest = server.run(main())
    assert [t for p in pieces for t in p.token_ids] == want.token_ids
    assert rest[-1].finish_reason in ("cancelled", "length")

    async def settled():
        for _ in range(200):
            if engine.stats().slots_in_use == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert server.run(settled())
