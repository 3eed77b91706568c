"""/v1/chat/completions and the chat template."""

import json

import httpx
import openai
import pytest
from conftest import make_client, tiny_settings

import gpt
from server.chat_template import ChatTemplate

TOK = gpt.get_tokenizer("byte")
NO_EOS = {"ignore_eos": True}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
]


def test_default_template_renders_plain_text_turns():
    prompt = ChatTemplate().render([(m["role"], m["content"]) for m in MESSAGES])
    assert prompt == "System: Be brief.\nUser: Hi!\nAssistant: Hello.\nUser: How are you?\nAssistant:"
    assert ChatTemplate().render([("developer", "x")], add_generation_prompt=False) == "System: x\n"
    assert "\nUser:" in ChatTemplate().stop  # the model must not write the user's next turn


def test_chat_completion_counts_the_rendered_prompt(openai_client, live_server):
    r = openai_client.chat.completions.create(
        model=live_server.model, messages=MESSAGES, max_tokens=7, temperature=0, extra_body=NO_EOS
    )
    rendered = ChatTemplate().render([(m["role"], m["content"]) for m in MESSAGES])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(TOK.encode(rendered))
    assert r.usage.completion_tokens == 7


@pytest.mark.parametrize("n", [1, 3])
def test_chat_stream_equals_non_streamed_and_finishes_once_per_choice(openai_client, live_server, n):
    kw = dict(
        model=live_server.model,
        messages=MESSAGES,
        max_completion_tokens=12,
        n=n,
        seed=11,
        temperature=1.0,
        extra_body=NO_EOS,
    )
    whole = openai_client.chat.completions.create(**kw)
    chunks = list(
        openai_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    texts, reasons, roles = {}, {}, {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles[c.index] = roles.get(c.index, 0) + 1
            if c.finish_reason:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    assert [texts[i] for i in range(n)] == [c.message.content for c in whole.choices]
    assert reasons == {i: ["length"] for i in range(n)} and roles == {i: 1 for i in range(n)}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 12 * n  # max_completion_tokens is max_tokens' alias


def test_chat_logprobs_format(openai_client, live_server):
    r = openai_client.chat.completions.create(
        model=live_server.model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.bytes) == 1  # byte tokenizer: one byte per token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    assert (
        bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    )


def test_content_parts_are_joined(openai_client, live_server):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "How are "}, {"type": "text", "text": "you?"}]}
    ]
    plain = [{"role": "user", "content": "How are you?"}]
    kw = dict(model=live_server.model, max_tokens=6, temperature=0, extra_body=NO_EOS)
    a = openai_client.chat.completions.create(messages=parts, **kw)
    b = openai_client.chat.completions.create(messages=plain, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_custom_chat_template_file_and_its_stop(tmp_path, tiny_checkpoint, server_factory, live_server):
    # What the model writes after the rendered prompt, found through /v1/completions ...
    rendered = "Q: 2+2?\nA:"
    sampling = dict(max_tokens=30, temperature=1.0, seed=4, extra_body=NO_EOS)
    full = (
        make_client(live_server)
        .completions.create(model=live_server.model, prompt=rendered, **sampling)
        .choices[0]
        .text
    )
    k = next(i for i in range(3, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[k : k + 3]
    k = full.find(stop)
    # ... is cut at the template's stop string, as "\nUser:" cuts the default template's replies.
    spec = {
        "roles": {"user": {"prefix": "Q: ", "suffix": "\n"}, "assistant": {"prefix": "A: ", "suffix": "\n"}},
        "generation_prompt": "A:",
        "stop": ["\nQ:", stop],
    }
    path = tmp_path / "template.json"
    path.write_text(json.dumps(spec))
    server = server_factory(tiny_settings(tiny_checkpoint, chat_template=str(path)))
    client = make_client(server)
    r = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "2+2?"}], **sampling
    )
    assert r.usage.prompt_tokens == len(rendered)
    assert r.choices[0].message.content == full[:k] and r.choices[0].finish_reason == "stop"
    tokens = httpx.post(
        server.url + "/tokenize", json={"messages": [{"role": "user", "content": "2+2?"}]}
    ).json()
    assert tokens["tokens"] == TOK.encode(rendered)
    # a role the template lacks is a 400 naming the message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "system", "content": "x"}], max_tokens=2
        )
    assert err.value.status_code == 400 and err.value.body["param"] == "messages.0.role"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"roles": {"user": {"prefix": "U"}}}, "needs the role 'assistant'"),
        ({"roles": {"user": {}, "assistant": {}}, "stop": [""]}, "non-empty strings"),
        ({"roles": {"user": {"prefix": 1}, "assistant": {}}}, "string values"),
        ({"roles": {"user": {}, "assistant": {}}, "colour": "red"}, "unknown chat template keys"),
        ([], "JSON object"),
    ],
)
def test_bad_chat_template_files_are_rejected_with_the_reason(tmp_path, spec, fragment):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=fragment) as err:
        ChatTemplate.from_file(path)
    assert str(path) in str(err.value)


def test_the_next_turn_of_a_chat_reports_the_history_as_cached_tokens(openai_client, live_server):
    history = [
        {"role": "system", "content": "You answer in riddles."},
        {"role": "user", "content": "Who are you?"},
    ]
    first = openai_client.chat.completions.create(
        model=live_server.model, messages=history, max_tokens=5, temperature=0, extra_body=NO_EOS
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = openai_client.chat.completions.create(
        model=live_server.model, messages=history, max_tokens=3, temperature=0, extra_body=NO_EOS
    )
    system_and_question = len(TOK.encode("System: You answer in riddles.\nUser: Who are you?\nAssistant:"))
    assert (
        system_and_question <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    )
    chunks = list(
        openai_client.chat.completions.create(
            model=live_server.model,
            messages=history,
            max_tokens=3,
            temperature=0,
            extra_body=NO_EOS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
