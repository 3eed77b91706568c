"""gpt-chat keeps going on a small model: before each turn the conversation is fitted to the
model's context (the tiny test model has TINY_CONTEXT = 128 tokens, one per byte)."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from client.chat import ChatClient, Session, build_parser
from client.context import Fit, cut_note

DROPPED = "(older turns dropped to fit the model's 128-token context)"


def run_session(server, lines: list[str], *options: str) -> tuple[int, str, str, list, ChatClient]:
    """A piped gpt-chat session through the client's own API: (status, stdout, stderr, what each
    turn sent as (messages, max_tokens), the client)."""
    args = build_parser().parse_args(["--url", server.url, "--seed", "3", *options])
    client = ChatClient(args.url)
    sent = []
    real = client.stream_chat

    def spy(messages, model, reply, **params):
        sent.append(([dict(m) for m in messages], params.get("max_tokens")))
        return real(messages, model, reply, **params)

    client.stream_chat = spy
    stdin, stdout, stderr = io.StringIO("".join(f"{line}\n" for line in lines)), io.StringIO(), io.StringIO()
    status = Session(client, server.model, args, stdin, stdout, stderr).run()
    return status, stdout.getvalue(), stderr.getvalue(), sent, client


def prompt_tokens(client: ChatClient, model: str, messages: list[dict]) -> int:
    return client.count_tokens(messages, model)[0]


@pytest.mark.parametrize("max_tokens", [None, 100], ids=["server-default", "max-tokens-100"])
def test_twenty_turns_on_a_128_token_context_never_fail_and_keep_the_newest_turns(live_server, max_tokens):
    turns = [f"turn {i}" for i in range(1, 21)]
    options = [] if max_tokens is None else ["--max-tokens", str(max_tokens)]
    status, stdout, stderr, sent, client = run_session(
        live_server, turns, "--system", "Be brief.", "--usage", *options
    )
    try:
        assert status == 0 and "error" not in stderr, stderr
        assert len(sent) == 20
        assert stderr.count(DROPPED) == 1  # said once, though most turns dropped some
        for i, (messages, sent_max) in enumerate(sent):
            # the system message stays; whole turns go, oldest first; the newest message is last
            assert messages[0] == {"role": "system", "content": "Be brief."}
            assert messages[-1] == {"role": "user", "content": turns[i]}
            users = [m["content"] for m in messages if m["role"] == "user"]
            assert users == turns[i + 1 - len(users) : i + 1]
            assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * (len(users) - 1) + ["user"]
            # max_tokens is capped to the room the prompt leaves
            prompt = prompt_tokens(client, live_server.model, messages)
            if max_tokens is None:
                assert sent_max is None and prompt < 128
            else:
                assert sent_max == min(max_tokens, 128 - prompt)
        assert any(m is not None and m < max_tokens for _, m in sent) or max_tokens is None
        assert len(sent[-1][0]) < len(sent[0][0]) + 2 * 19  # turns were dropped
        # every reply printed, a blank line between them (piped output)
        assert stdout.count("\n\n") >= 19 and len(stderr.splitlines()) >= 20
    finally:
        client.close()


def test_a_reply_cut_by_the_context_is_marked_and_the_next_turn_fits(live_server):
    # no --max-tokens: the server's default (256) is more than the room, so replies fill the context
    status, _, stderr, sent, client = run_session(live_server, ["hi", "more", "again"], "--usage")
    client.close()
    assert status == 0, stderr
    finishes = stderr.count("finish_reason=length")
    assert stderr.count("(reply cut: it filled the model's 128-token context)") == finishes > 0
    assert len(sent) == 3 and DROPPED in stderr


def test_a_reply_cut_by_max_tokens_is_marked(live_server):
    status, _, stderr, _, client = run_session(live_server, ["hi"], "--max-tokens", "1", "--usage")
    client.close()
    assert status == 0 and "finish_reason=length" in stderr
    assert "(reply cut at --max-tokens 1)" in stderr


def test_cut_note_names_what_cut_the_reply():
    full = {"prompt_tokens": 100, "completion_tokens": 28}
    assert "128-token context" in cut_note(Fit([], context=128, max_tokens=None), full, None)
    capped = Fit([], context=128, max_tokens=20)
    assert "128-token context" in cut_note(capped, {"prompt_tokens": 10, "completion_tokens": 20}, 50)
    assert cut_note(Fit([], context=128, max_tokens=5), {"prompt_tokens": 10, "completion_tokens": 5}, 5) == (
        "(reply cut at --max-tokens 5)"
    )
    assert "server's limit" in cut_note(Fit([]), None, None)  # a server that cannot count


def test_a_message_too_long_for_the_context_is_one_line_and_the_chat_goes_on(live_server):
    status, stdout, stderr, sent, client = run_session(live_server, ["x" * 300, "hi"], "--max-tokens", "4")
    client.close()
    assert status == 1  # piped: a turn failed
    errors = [line for line in stderr.splitlines() if line.startswith("gpt-chat: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "128 tokens" in errors[0], stderr
    assert [m for m, _ in sent] == [[{"role": "user", "content": "hi"}]]  # never sent; "hi" was
    assert stdout.endswith("\n") and "Traceback" not in stderr


def test_reset_clears_the_conversation_and_the_dropped_note_comes_again(live_server):
    lines = [f"turn {i}" for i in range(6)] + ["/reset", "after", *[f"more {i}" for i in range(6)]]
    status, _, stderr, sent, client = run_session(live_server, lines, "--max-tokens", "30")
    client.close()
    assert status == 0, stderr
    assert sent[6][0] == [{"role": "user", "content": "after"}]
    assert "(conversation reset)" in stderr and stderr.count(DROPPED) == 2


# ---- the gpt-chat process on a pseudo-terminal


def ctrl_c_as_at_a_shell() -> None:
    """In the child: SIGINT handled by default and not blocked, as a shell starts a command. A
    test worker may have inherited it ignored or blocked from something that ran before, and a
    child inherits both."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Terminal:
    """gpt-chat on a pseudo-terminal: what a person at a terminal sees and does."""

    def __init__(self, url: str, *options: str, stdout=None):
        import pty

        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GPT_CHAT_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.chat", "--url", url, *options],
            stdin=slave,
            stdout=slave if stdout is None else stdout,
            stderr=slave,
            env=env,
            preexec_fn=ctrl_c_as_at_a_shell,
        )
        os.close(slave)
        self.master, self.output = master, b""

    def read_until(self, marker: bytes, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(marker) < count and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    return

    def say(self, text: str) -> None:
        prompts = self.output.count(b"you> ")
        os.write(self.master, text.encode() + b"\n")
        self.read_until(b"you> ", prompts + 1)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        try:
            status = self.proc.wait(timeout=timeout)
            self.read_until(b"\0never", timeout=0.5)  # drain what is left
        finally:
            self.proc.kill()
            os.close(self.master)
        return status, self.output.decode("utf-8", errors="replace")


def test_gpt_chat_on_a_terminal_keeps_going_for_twenty_turns_and_ctrl_d_exits_0(live_server):
    term = Terminal(live_server.url, "--seed", "5", "--max-tokens", "40")
    term.read_until(b"you> ")
    for i in range(20):
        term.say(f"turn {i}")
    term.say("/reset")
    os.write(term.master, b"\x04")  # Ctrl-D at the prompt
    status, text = term.finish()
    assert status == 0, text
    banner = text.splitlines()[0]
    assert "128-token context" in banner and all(c in banner for c in ("/reset", "/quit", "Ctrl-D", "/help"))
    assert "error" not in text and "Traceback" not in text
    assert text.count(f"\x1b[2m{DROPPED}\x1b[0m") == 1  # dim, once
    assert "\x1b[2m(conversation reset)\x1b[0m" in text


def test_replies_typed_at_a_terminal_into_a_file_are_the_replies_alone_a_blank_line_apart(
    live_server, tmp_path
):
    path = tmp_path / "replies.txt"
    with open(path, "wb") as out:
        term = Terminal(live_server.url, "--seed", "5", "--max-tokens", "6", stdout=out)
        term.read_until(b"you> ")
        term.say("hi")
        term.say("and then?")
        os.write(term.master, b"/quit\n")
        status, text = term.finish()
    assert status == 0, text
    replies = path.read_bytes().decode("utf-8", errors="replace")
    assert "you> " not in replies and text.count("you> ") == 3  # the prompt stays on the terminal
    assert replies.count("\n\n") >= 1 and replies.endswith("\n")


def test_ctrl_c_at_the_prompt_exits_130_with_one_line(live_server):
    term = Terminal(live_server.url)
    term.read_until(b"you> ")
    # Python's readline prints the prompt before it waits for input; a signal in between is seen
    # only at the next key. A person is slower than that.
    time.sleep(0.3)
    term.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    status, text = term.finish()
    assert status == 130, text
    assert "Traceback" not in text and text.rstrip().endswith("gpt-chat: interrupted")


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(paced_live_server):
    term = Terminal(paced_live_server.url, "--max-tokens", "100")  # 20 ms a token: 2 s a reply
    term.read_until(b"you> ")
    os.write(term.master, b"hi\n")
    term.read_until(b"hi\r\n")
    time.sleep(0.5)  # the reply is streaming
    term.proc.send_signal(signal.SIGINT)
    term.read_until(b"(reply stopped)")
    term.read_until(b"you> ", 2)
    os.write(term.master, b"/quit\n")
    status, text = term.finish()
    assert status == 0 and "(reply stopped)" in text and "Traceback" not in text, text


def test_ctrl_c_while_connecting_exits_130_with_one_line():
    import socket

    with socket.socket() as s:  # a server that accepts the connection and never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(30)
        term = Terminal(f"http://127.0.0.1:{s.getsockname()[1]}")
        conn, _ = s.accept()  # gpt-chat is waiting for GET /v1/models
        term.proc.send_signal(signal.SIGINT)
        status, text = term.finish()
        conn.close()
    assert status == 130 and text.strip() == "gpt-chat: interrupted", text


def test_help_uses_short_metavars():
    text = build_parser().format_help()
    usage = build_parser().format_usage()
    for long in ("API_KEY", "MAX_TOKENS", "TOP_P", "TEMPERATURE", "TIMEOUT", "MODEL", "SEED"):
        assert long not in usage
    for short in ("--url URL", "--api-key KEY", "--model NAME", "--max-tokens N", "--seed N", "--top-p P"):
        assert short in text
