"""gpt-chat against a real server on a loopback port: run as a subprocess with piped stdin."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from client.chat import ChatClient, ChatError, Reply

# The tiny test model has a 64-byte context: short messages and replies keep two turns inside it.
SAMPLING = dict(temperature=0.9, seed=7, max_tokens=8)
USAGE = re.compile(r"\[prompt_tokens=(\d+) completion_tokens=(\d+) finish_reason=(\w+)\]")


def gpt_chat(url: str, stdin: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run gpt-chat; stdout is decoded by hand so that a "\r" in a reply stays a "\r"."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GPT_CHAT_URL")
    }
    env = {**inherited, "PYTHONIOENCODING": "utf-8", **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", "client.chat", "--url", url, *args],
        input=stdin.encode(),
        capture_output=True,
        env=env,
        timeout=120,
    )
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def sampling_args(**overrides) -> list[str]:
    s = {**SAMPLING, **overrides}
    return [
        "--temperature",
        str(s["temperature"]),
        "--seed",
        str(s["seed"]),
        "--max-tokens",
        str(s["max_tokens"]),
        "--usage",
    ]


def api_reply(openai_client, model: str, messages: list[dict], **overrides) -> tuple[str, int]:
    """The non-streamed reply and its prompt token count, for the same messages and sampling."""
    r = openai_client.chat.completions.create(model=model, messages=messages, **{**SAMPLING, **overrides})
    return r.choices[0].message.content, r.usage.prompt_tokens


@pytest.fixture(scope="module")
def model(live_server):
    return live_server.model


def test_gpt_chat_streams_replies_equal_to_the_api_keeping_history_until_reset(
    live_server, openai_client, model
):
    r = gpt_chat(live_server.url, "hi\nok\n/reset\nhi\n/quit\nnever sent\n", *sampling_args())
    assert r.returncode == 0, r.stderr

    first, first_prompt = api_reply(openai_client, model, [{"role": "user", "content": "hi"}])
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "ok"},
    ]
    second, second_prompt = api_reply(openai_client, model, history)
    assert first and second
    # stdout holds exactly the replies, one per turn, a blank line between them (piped output has
    # no prompt to separate them); after /reset the conversation starts over, and /quit ends the
    # session before the last line
    assert r.stdout == f"{first}\n\n{second}\n\n{first}\n"
    usages = [(int(p), int(c)) for p, c, _ in USAGE.findall(r.stderr)]
    assert [p for p, _ in usages] == [first_prompt, second_prompt, first_prompt]
    assert second_prompt > first_prompt + usages[0][1]  # the second turn carried the first
    assert "(conversation reset)" in r.stderr


def test_gpt_chat_system_message_opens_the_conversation_and_survives_reset(live_server, openai_client, model):
    system = {"role": "system", "content": "Be terse."}
    r = gpt_chat(live_server.url, "hi\n/reset\nhi\n", *sampling_args(), "--system", system["content"])
    assert r.returncode == 0, r.stderr
    reply, prompt = api_reply(openai_client, model, [system, {"role": "user", "content": "hi"}])
    assert r.stdout == f"{reply}\n\n{reply}\n"
    assert [int(p) for p, _, _ in USAGE.findall(r.stderr)] == [prompt, prompt]


def test_stream_chat_yields_the_reply_in_several_pieces(paced_live_server, openai_client, model):
    live_server = paced_live_server
    client = ChatClient(live_server.url + "/v1", api_key=live_server.api_key)  # /v1 is accepted too
    try:
        messages = [{"role": "user", "content": "count"}]
        reply = Reply()
        pieces = list(client.stream_chat(messages, model, reply, **SAMPLING))
    finally:
        client.close()
    expected, prompt_tokens = api_reply(openai_client, model, messages)
    assert len(pieces) > 1 and "".join(pieces) == reply.text == expected
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage["prompt_tokens"] == prompt_tokens


def test_gpt_chat_turn_the_server_refuses_prints_its_error_and_the_session_goes_on(
    live_server, openai_client, model
):
    bad_seed = str(2**64)  # beyond what the server takes: every turn is refused
    r = gpt_chat(live_server.url, "hi\n/reset\nhi\n", "--seed", bad_seed, "--max-tokens", "4")
    assert r.returncode == 1  # a turn failed
    errors = [line for line in r.stderr.splitlines() if line.startswith("gpt-chat: error:")]
    assert len(errors) == 2 and all("(HTTP 400)" in e for e in errors), r.stderr
    with pytest.raises(Exception) as api_error:  # the same message the API gives for it
        openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, seed=int(bad_seed)
        )
    assert api_error.value.body["message"] in errors[0]
    assert "(conversation reset)" in r.stderr  # the session went on after the failure
    assert r.stdout == "" and "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["server down", "unknown model", "bad option"])
def test_gpt_chat_startup_failure_is_one_line_and_exit_2(live_server, case):
    if case == "server down":
        r = gpt_chat(f"http://127.0.0.1:{_free_port()}", "hi\n")
        assert "cannot connect" in r.stderr
    elif case == "unknown model":
        r = gpt_chat(live_server.url, "hi\n", "--model", "no-such-model")
        assert "no-such-model" in r.stderr
    else:
        r = gpt_chat(live_server.url, "hi\n", "--top-p", "1.5")
        assert "--top-p" in r.stderr
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_client_reports_the_servers_error_message_on_a_bad_request(live_server, model):
    client = ChatClient(live_server.url, api_key=live_server.api_key)
    try:
        with pytest.raises(ChatError, match=r"\(HTTP 4\d\d\)"):
            list(client.stream_chat([{"role": "user", "content": "hi"}], model, Reply(), temperature=-1))
    finally:
        client.close()


def test_gpt_chat_sends_the_api_key_and_reports_a_rejected_one(tiny_checkpoint, server_factory):
    from server.app import load_engine
    from server.config import Settings

    settings = Settings(model=tiny_checkpoint, api_key="sekret", max_batch_size=2)
    server = server_factory(settings, engine=load_engine(settings))
    missing = gpt_chat(server.url, "hi\n")
    wrong = gpt_chat(server.url, "hi\n", "--api-key", "nope")
    for r in (missing, wrong):
        assert r.returncode == 2 and r.stdout == ""
        assert "(HTTP 401)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "pass --api-key KEY or set OPENAI_API_KEY" in r.stderr  # what a gpt-chat user can do
    assert "wants an API key" in missing.stderr and "rejected the API key" in wrong.stderr
    by_option = gpt_chat(server.url, "hi\n", "--api-key", "sekret", *sampling_args())
    by_env = gpt_chat(server.url, "hi\n", *sampling_args(), env={"OPENAI_API_KEY": "sekret"})
    assert by_option.returncode == by_env.returncode == 0, by_option.stderr + by_env.stderr
    assert by_option.stdout == by_env.stdout and by_option.stdout.strip("\n")


def test_gpt_chat_on_a_terminal_prompts_and_shows_control_characters_as_escapes(
    live_server, openai_client, model
):
    pty = pytest.importorskip("pty")
    from client.chat import _CONTROLS

    # The untrained byte-level model emits raw bytes: find a seed whose reply holds a control character.
    for seed in range(50):
        reply, _ = api_reply(openai_client, model, [{"role": "user", "content": "hi"}], seed=seed)
        if any(ord(c) in _CONTROLS for c in reply):
            break
    else:
        pytest.fail("no reply with a control character in 50 seeds")
    shown = reply.translate(_CONTROLS)

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.chat", "--url", live_server.url, *sampling_args(seed=seed)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    output = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal output
        deadline = time.monotonic() + 60
        while output.count(marker) < count and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(b"you> ", 1)
        os.write(master, b"hi\n")
        read_until(b"you> ", 2)
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
        read_until(b"\0never", 1)  # drain what is left
    finally:
        proc.kill()
        os.close(master)
    text = output.decode("utf-8", errors="replace")
    assert shown.replace("\n", "\r\n") in text  # the terminal turns "\n" into "\r\n"
    own = text.replace("\r", "").replace("\a", "").replace("\x1b[2m", "").replace("\x1b[0m", "")  # dim notes
    assert not any(ord(c) in _CONTROLS for c in own)
    assert "finish_reason=" in text and "/reset" in text  # usage line, and the greeting names the commands


# ---- the stream parser against canned responses (no server): what other servers may send


def _chunk(content=None, finish=None, index=0) -> str:
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


def _canned(body: str, status: int = 200, content_type: str = "text/event-stream") -> ChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body.encode(), headers={"content-type": content_type})

    return ChatClient("http://canned", transport=httpx.MockTransport(handler))


def _run(client: ChatClient) -> tuple[list[str], Reply]:
    reply = Reply()
    try:
        return list(client.stream_chat([{"role": "user", "content": "hi"}], "m", reply)), reply
    finally:
        client.close()


def test_stream_parser_takes_crlf_comments_other_fields_and_other_choices_in_stride():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = (
        ": keep-alive\r\n\r\n"
        f"data: {_chunk('a')}\r\n\r\n"
        f"event: message\nid: 7\ndata: {_chunk('ignored', index=1)}\n\n"
        f"data:{_chunk('b', finish='length')}\n\n"
        f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        "data: [DONE]\n\n"
    )
    pieces, reply = _run(_canned(body))
    assert pieces == ["a", "b"] and reply.text == "ab"
    assert reply.finish_reason == "length" and reply.usage == usage


@pytest.mark.parametrize(
    "body, message",
    [
        (
            f"data: {_chunk('a')}\n\ndata: {json.dumps({'error': {'message': 'engine failed'}})}\n\n",
            "engine failed",
        ),
        (f"data: {_chunk('a')}\n\n", "ended before the reply was finished"),
        ("data: {not json\n\n", "malformed stream chunk"),
    ],
    ids=["error-chunk", "cut-off", "malformed"],
)
def test_stream_problems_become_one_line_errors(body, message):
    with pytest.raises(ChatError, match=message):
        _run(_canned(body))


@pytest.mark.parametrize(
    "status, body, content_type, message",
    [
        (
            401,
            '{"error": {"message": "bad key", "type": "authentication_error", "param": null, '
            '"code": "invalid_api_key"}}',
            "application/json",
            "bad key (HTTP 401)",
        ),
        (422, '{"detail": "field required"}', "application/json", "field required (HTTP 422)"),
        (502, "<html>Bad Gateway</html>\n<p>nginx</p>", "text/html", "HTTP 502: <html>Bad Gateway</html>"),
    ],
    ids=["openai-error", "fastapi-detail", "proxy-page"],
)
def test_http_errors_give_the_servers_message(status, body, content_type, message):
    with pytest.raises(ChatError) as e:
        _run(_canned(body, status, content_type))
    assert str(e.value) == message


def test_gpt_chat_imports_neither_torch_nor_the_server_nor_the_library():
    """gpt-chat starts at once on any machine: its imports stay off torch and our other packages."""
    code = (
        "import sys, client.chat; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gpt', 'server', 'training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_stop_strings_read_escapes_as_gpt_generate_and_the_page_do():
    import io

    from client.chat import Session, build_parser

    args = build_parser().parse_args(["--stop", "\\n\\n", "--stop", "A:"])
    session = Session(None, "m", args, io.StringIO(), io.StringIO(), io.StringIO())
    assert session.params["stop"] == ["\n\n", "A:"]
