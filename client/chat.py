"""gpt-chat: a terminal chat client for any OpenAI-compatible server, streaming each reply.

    gpt-chat                                  # talk to gpt-serve on http://127.0.0.1:8000
    gpt-chat --url http://host:8000 --api-key KEY --temperature 0.7 --system "Be brief."

Type a message and press Enter; the reply prints token by token as the server streams it.
Before each turn the conversation is fitted to the model's context (client/context.py): the
system message and the newest turns stay, the oldest go. `/reset` forgets the conversation,
`/quit` (or Ctrl-D) leaves, Ctrl-C stops a reply midway and, anywhere else, leaves (exit 130).
Only the replies go to stdout, so `echo hi | gpt-chat > reply.txt` captures exactly the text.
This module needs only httpx: no torch, so it starts instantly and runs on any machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from cli_args import Parser, float_in, positive_int, unescape

from .api import ChatClient, ChatError, Reply
from .context import DoesNotFit, Fit, cut_note, fit

__all__ = ["ChatClient", "ChatError", "Reply", "build_parser", "chat_loop", "main"]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "OPENAI_API_KEY"
COMMANDS = "/reset (forget the conversation), /quit or Ctrl-D (leave), /help; Ctrl-C stops a reply"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = Parser(
        prog="gpt-chat",
        description=(
            "Chat with a model served by gpt-serve or any OpenAI-compatible server; replies stream "
            "token by token, and the oldest turns make way when the model's context is full. "
            "In the chat: /reset forgets the conversation, /quit or Ctrl-D leaves, /help."
        ),
    )
    p.add_argument(
        "--url",
        metavar="URL",
        default=env.get("GPT_CHAT_URL") or env.get("OPENAI_BASE_URL") or DEFAULT_URL,
        help="server base URL, with or without /v1 (env GPT_CHAT_URL or OPENAI_BASE_URL; "
        f"default {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=env.get(API_KEY_ENV) or None,
        help=f"bearer token, if the server wants one (env {API_KEY_ENV})",
    )
    p.add_argument(
        "--model", metavar="NAME", default=None, help="model name (default: the first of GET /v1/models)"
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    p.add_argument(
        "--temperature",
        "-t",
        metavar="T",
        type=float_in(0.0, 2.0),
        default=None,
        help="sampling temperature in [0, 2]; 0 is greedy (default: the server's)",
    )
    p.add_argument(
        "--top-p",
        metavar="P",
        type=float_in(0.0, 1.0, lo_open=True),
        default=None,
        help="nucleus sampling mass in (0, 1] (default: the server's)",
    )
    p.add_argument(
        "--max-tokens",
        "-n",
        metavar="N",
        type=positive_int,
        default=None,
        help="most tokens per reply, less where the context has less room (default: the server's)",
    )
    p.add_argument(
        "--seed", metavar="N", type=int, default=None, help="random seed, for reproducible replies"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="end a reply when this text appears (repeatable); \\n, \\t, \\r and \\\\ are read as escapes",
    )
    p.add_argument(
        "--usage",
        action="store_true",
        help="after each reply, print its token counts and finish reason to stderr",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float_in(0.0, 1e6, lo_open=True),
        default=600.0,
        help="seconds to wait for the server's next chunk (600)",
    )
    return p


# Model output is untrusted text: on a terminal, control characters (ESC sequences can move the
# cursor, retitle the window, ...) are shown as escapes instead. Piped output stays exact.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}


def _usage_line(reply: Reply) -> str:
    u = reply.usage or {}
    return (
        f"[prompt_tokens={u.get('prompt_tokens', '?')} completion_tokens="
        f"{u.get('completion_tokens', '?')} finish_reason={reply.finish_reason}]"
    )


def explain(e: Exception, client: ChatClient) -> str:
    """The error's one line, for a gpt-chat user: a rejected key says how to give one."""
    if isinstance(e, ChatError) and e.status == 401:
        what = "rejected the API key given" if client.api_key else "wants an API key"
        return f"the server {what}: pass --api-key KEY or set {API_KEY_ENV} (it said: {e})"
    return str(e)


class Session:
    """One chat: the conversation, fitted to the model's context before each turn."""

    def __init__(self, client: ChatClient, model: str, args, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.client, self.model, self.args = client, model, args
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.show = (lambda text: text.translate(_CONTROLS)) if stdout.isatty() else (lambda text: text)
        # notes are dim on a terminal, so that they stand apart from the replies
        self.dim = (lambda text: f"\x1b[2m{text}\x1b[0m") if stderr.isatty() else (lambda text: text)
        # Where no "you> " prompt stands between replies (piped input or output), a blank line does.
        self.separate = not (self.interactive and stdout.isatty())
        self.opening = [{"role": "system", "content": args.system}] if args.system else []
        self.messages = list(self.opening)
        self.context: int | None = getattr(args, "context", None)
        self.params = dict(
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=[unescape(x) for x in args.stop] if args.stop else None,
        )
        self.failed = self.replies = 0
        self.noted_drop = False

    def note(self, text: str) -> None:
        print(self.dim(text), file=self.stderr)

    def error(self, e: Exception) -> None:
        print(f"gpt-chat: error: {explain(e, self.client)}", file=self.stderr)

    def reset(self) -> None:
        self.messages = list(self.opening)
        self.noted_drop = False

    def run(self) -> int:
        """Read and answer lines until EOF or /quit: 0, or 1 where a piped session had a turn fail
        (at a terminal, each failure was shown as it happened). Ctrl-C at the prompt raises."""
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            context = f", {self.context}-token context" if self.context else ""
            where = f"{self.model} at {self.client.url}{context}"
            print(f"gpt-chat: {where}; commands: {COMMANDS}", file=self.stderr)
        while True:
            try:
                line = self._read_line()
            except EOFError:  # Ctrl-D
                print(file=self.stderr)
                return 0
            if not self.interactive and line == "":  # EOF
                return 1 if self.failed else 0
            text = line.rstrip("\r\n")
            command = text.strip()
            if not command:
                continue
            if command in ("/quit", "/exit"):
                return 1 if self.failed and not self.interactive else 0
            if command == "/reset":
                self.reset()
                self.note("(conversation reset)")
            elif command == "/help":
                print(f"commands: {COMMANDS}", file=self.stderr)
            elif command.startswith("/") and " " not in command:
                print(f"unknown command {command}; commands: {COMMANDS}", file=self.stderr)
            else:
                self.turn(text)

    def _read_line(self) -> str:
        if not self.interactive:
            return self.stdin.readline()
        if self.stdout.isatty():
            return input("you> ")
        # stdout is a file or a pipe (`gpt-chat > replies.txt`): the prompt goes to the terminal
        self.stderr.write("you> ")
        self.stderr.flush()
        return input()

    def turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            fitted = fit(
                self.client, self.model, self.messages, len(self.opening), self.args.max_tokens, self.context
            )
        except (DoesNotFit, ChatError) as e:
            self.messages.pop()  # the turn failed: the conversation goes on as if it was never sent
            self.failed += 1
            self.error(e)
            return
        self.context = fitted.context or self.context
        if fitted.dropped:
            self.messages = fitted.messages  # dropped for good: later turns would not fit them either
            if not self.noted_drop:
                self.note(f"(older turns dropped to fit the model's {fitted.context}-token context)")
                self.noted_drop = True
        self.answer(fitted)

    def answer(self, fitted: Fit) -> None:
        reply = Reply()
        stream = self.client.stream_chat(
            self.messages, self.model, reply, max_tokens=fitted.max_tokens, **self.params
        )
        started = False
        try:
            for piece in stream:
                if not started:
                    self._start_reply()
                    started = True
                self.stdout.write(self.show(piece))
                self.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            reply.interrupted = True
        except ChatError as e:
            self.stdout.write("\n" if reply.text else "")
            self.stdout.flush()
            self.error(e)
            self.messages.pop()
            self.failed += 1
            return
        finally:
            stream.close()  # closes the connection now, so the server cancels a stopped reply
        if not started:
            self._start_reply()
        self.stdout.write("\n")
        self.stdout.flush()
        # The reply (even a stopped one: the user saw it) becomes context for the next turn.
        self.messages.append({"role": "assistant", "content": reply.text})
        if reply.interrupted:
            self.note("(reply stopped)")
        elif reply.finish_reason == "length":
            self.note(cut_note(fitted, reply.usage, self.args.max_tokens))
        if self.args.usage and not reply.interrupted:
            print(_usage_line(reply), file=self.stderr)

    def _start_reply(self) -> None:
        if self.separate and self.replies:
            self.stdout.write("\n")
        self.replies += 1


def chat_loop(client: ChatClient, model: str, args, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    return Session(client, model, args, stdin, stdout, stderr).run()


def main(argv: Sequence[str] | None = None) -> int:
    """gpt-chat's exit status: 0, 1 where a piped turn failed, 2 where the chat could not start,
    130 on Ctrl-C (outside a reply, which it stops): one line, no traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(("\n" if sys.stderr.isatty() else "") + "gpt-chat: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a reply the console cannot encode must not end the chat
            stream.reconfigure(errors="replace")
    client = ChatClient(args.url, api_key=args.api_key, timeout=args.timeout)
    try:
        try:
            served = client.models()
        except ChatError as e:
            print(f"gpt-chat: error: {explain(e, client)}", file=sys.stderr)
            return 2
        model = args.model
        if model is None:
            if not served:
                print(f"gpt-chat: error: {client.url} serves no models", file=sys.stderr)
                return 2
            model = next(iter(served))
        elif model not in served:
            print(
                f"gpt-chat: error: model {model!r} is not served at {client.url} "
                f"(it serves: {', '.join(served) or 'nothing'})",
                file=sys.stderr,
            )
            return 2
        args.context = served[model]
        return chat_loop(client, model, args, sys.stdin, sys.stdout, sys.stderr)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
