"""What gets served: an encoder-decoder, a Hugging Face GPT-2 directory, a model loaded in the
background; the tokenizer endpoints, probes and the chat page."""

import time

import httpx
import pytest
import torch
from conftest import TINY_CONTEXT, TINY_MODEL_NAME, make_client, start_live_server, tiny_settings

import gpt
from server.app import create_app, load_engine
from server.config import Settings

NO_EOS = {"ignore_eos": True}


def test_seq2seq_checkpoint_is_served(tiny_s2s_checkpoint, server_factory):
    settings = tiny_settings(tiny_s2s_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))
    client = make_client(server)
    kw = dict(model=server.model, prompt="translate me", max_tokens=9, temperature=0, extra_body=NO_EOS)
    whole = client.completions.create(**kw)
    assert whole.usage.prompt_tokens == len("translate me") and whole.usage.completion_tokens == 9
    model, tok = gpt.load(tiny_s2s_checkpoint)
    expected = gpt.generate(model, tok, "translate me", max_new_tokens=9, temperature=0, ignore_eos=True)
    assert whole.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == expected
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=NO_EOS
    )
    assert chat.usage.completion_tokens == 4
    # an encoder-decoder's output has the whole context to itself: the limit names max_tokens
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_quantize_int8_serves_what_the_quantized_library_generates(
    tiny_checkpoint, server_factory, monkeypatch
):
    monkeypatch.setenv("GPT_SERVE_QUANTIZE", "INT8")
    settings = Settings.from_env(model=tiny_checkpoint, served_model_name=TINY_MODEL_NAME)
    assert settings.quantize == "int8"
    server = server_factory(settings, engine=load_engine(settings))
    out = make_client(server).completions.create(
        model=server.model, prompt="quantized", max_tokens=8, temperature=0, extra_body=NO_EOS
    )
    model, tok = gpt.load(tiny_checkpoint)
    expected = gpt.generate(
        gpt.quantize(model), tok, "quantized", max_new_tokens=8, temperature=0, ignore_eos=True
    )
    assert out.choices[0].text == expected


def test_a_float16_kv_cache_is_what_the_engine_decodes_in(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("GPT_SERVE_KV_CACHE_DTYPE", "float16")
    settings = Settings.from_env(model=tiny_checkpoint, served_model_name=TINY_MODEL_NAME)
    engine = load_engine(settings)
    assert settings.kv_cache_dtype == "float16" and engine._sched.cache.layers[0].k.dtype == torch.float16


@pytest.mark.parametrize(
    "kv, kernel, warns", [("float16", False, True), ("float16", True, False), ("float32", False, False)]
)
def test_a_kv_cache_dtype_that_attention_must_convert_is_warned_of(
    tiny_checkpoint, monkeypatch, caplog, kv, kernel, warns
):
    monkeypatch.setattr(gpt.kernels, "attention_f16_available", lambda: kernel)
    with caplog.at_level("WARNING", logger="server"):
        load_engine(Settings(model=tiny_checkpoint, kv_cache_dtype=kv))
    assert ("--kv-cache-dtype" in caplog.text) == warns


def test_hugging_face_gpt2_directory_is_served(tmp_path, server_factory):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.preset("gpt-tiny", vocab_size=50257, tokenizer="gpt2")).eval()
    hf_dir = gpt.export_hf_gpt2(model, tmp_path / "hf-gpt2")
    settings = Settings(model=str(hf_dir))
    server = server_factory(settings, engine=load_engine(settings))
    assert server.model == "hf-gpt2"  # the directory's name by default
    client = make_client(server)
    r = client.completions.create(
        model="hf-gpt2", prompt="Hello world", max_tokens=6, temperature=0, extra_body=NO_EOS
    )
    tok = gpt.get_tokenizer("gpt2")
    assert r.usage.prompt_tokens == len(tok.encode("Hello world")) == 2
    assert r.choices[0].text == gpt.generate(
        model, tok, "Hello world", max_new_tokens=6, temperature=0, ignore_eos=True
    )
    assert [m.id for m in client.models.list().data] == ["hf-gpt2"]


def test_model_loads_in_the_background_and_ready_follows(tiny_checkpoint, server_factory):
    server = server_factory(tiny_settings(tiny_checkpoint))  # no engine: the lifespan loads it
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model never became ready"
        time.sleep(0.05)
    r = make_client(server).completions.create(
        model=server.model, prompt="x", max_tokens=2, extra_body=NO_EOS
    )
    assert r.usage.completion_tokens == 2


def test_a_model_that_fails_to_load_keeps_ready_503_with_the_reason(tmp_path):
    server = start_live_server(Settings(model=str(tmp_path / "missing"), served_model_name="m"))
    try:
        deadline = time.monotonic() + 30
        while server.app.state.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503 and "missing" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    finally:
        server.stop()


def test_tokenize_and_detokenize(live_server):
    r = httpx.post(live_server.url + "/tokenize", json={"prompt": "héllo"}).json()
    assert r == {"tokens": list("héllo".encode()), "count": 6, "max_model_len": TINY_CONTEXT}
    assert httpx.post(live_server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": "héllo"
    }
    for bad in ([300], [-1], ["a"], [1.5]):
        err = httpx.post(live_server.url + "/detokenize", json={"tokens": bad})
        assert err.status_code == 400 and err.json()["error"]["param"].startswith("tokens")
    err = httpx.post(live_server.url + "/tokenize", json={})
    assert err.status_code == 400


def test_models_endpoint_reports_the_context(openai_client, live_server):
    card = openai_client.models.list().data[0]
    assert card.id == live_server.model and card.object == "model"
    assert card.model_extra["max_model_len"] == TINY_CONTEXT


def test_models_suggest_completion_mode_unless_a_chat_template_was_given(
    openai_client, live_server, tmp_path, tiny_checkpoint, server_factory
):
    assert openai_client.models.list().data[0].model_extra["suggested_mode"] == "completion"
    assert openai_client.models.retrieve(live_server.model).model_extra["suggested_mode"] == "completion"
    path = tmp_path / "template.json"
    path.write_text('{"roles": {"user": {"prefix": "Q: "}, "assistant": {"prefix": "A: "}}}')
    server = server_factory(
        tiny_settings(tiny_checkpoint, chat_template=str(path))
    )  # loads in the background
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [c["suggested_mode"] for c in cards] == ["chat"]
    card = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["ModelCard"]
    assert card["properties"]["suggested_mode"]["enum"] == ["completion", "chat"]
    assert "--chat-template" in card["properties"]["suggested_mode"]["description"]
    assert "suggested_mode" in card["required"]


def test_web_page_and_its_script_are_served_without_a_key(tiny_checkpoint, server_factory):
    server = server_factory(tiny_settings(tiny_checkpoint, api_key="k"))
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower() and 'src="static/app.js"' in r.text
    r = httpx.get(server.url + "/static/app.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    for path in ("/", "/static/app.js"):  # revalidated, so an upgrade never mixes old and new files
        assert httpx.get(server.url + path).headers["cache-control"] == "no-cache"


def test_create_app_rejects_a_bad_chat_template(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        create_app(Settings(model="x", chat_template=str(path)))


def test_settings_from_env_and_overrides():
    env = {
        "GPT_SERVE_MODEL": "/m/ckpt",
        "GPT_SERVE_PORT": "9000",
        "GPT_SERVE_API_KEY": "k",
        "GPT_SERVE_TIMEOUT": "2.5",
        "GPT_SERVE_LOG_LEVEL": "DEBUG",
    }
    s = Settings.from_env(env, port=9100)
    assert (s.model, s.port, s.api_key, s.timeout, s.log_level) == ("/m/ckpt", 9100, "k", 2.5, "debug")
    assert s.model_name == "ckpt"
    with pytest.raises(ValueError, match="GPT_SERVE_MAX_QUEUE"):
        Settings.from_env({"GPT_SERVE_MAX_QUEUE": "many"})
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings(max_batch_size=0)
