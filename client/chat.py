"""gpt-chat: a terminal chat client for any OpenAI-compatible server, streaming each reply.

    gpt-chat                                  # talk to gpt-serve on http://127.0.0.1:8000
    gpt-chat --url http://host:8000 --api-key KEY --temperature 0.7 --system "Be brief."

Type a message and press Enter; the reply prints token by token as the server streams it.
`/reset` forgets the conversation, `/quit` (or Ctrl-D) leaves, Ctrl-C stops a reply midway.
Only the replies go to stdout, so `echo hi | gpt-chat > reply.txt` captures exactly the text.
This module needs only httpx: no torch, so it starts instantly and runs on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import httpx

from cli_args import Parser, float_in, positive_int

DEFAULT_URL = "http://127.0.0.1:8000"
HELP = "commands: /reset (forget the conversation), /quit (leave), /help"


class ChatError(Exception):
    """A failure worth one line to the user: the server's own error message where it sent one."""


@dataclass
class Reply:
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    interrupted: bool = False


@dataclass
class ChatClient:
    """The few calls gpt-chat needs, against `{url}/v1/...`."""

    url: str
    api_key: str | None = None
    timeout: float = 600.0
    transport: httpx.BaseTransport | None = None  # tests pass an httpx.MockTransport
    http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self):
        # OpenAI's convention puts /v1 in the base URL (OPENAI_BASE_URL); gpt-serve users give the
        # server root. Accept both.
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # A generous read timeout: it bounds the wait for each streamed chunk, not the whole reply.
        self.http = httpx.Client(
            base_url=self.url + "/v1",
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=10.0),
            transport=self.transport,
        )

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[str]:
        with self._request("GET", "/models") as r:
            body = _json_or_raise(r)
        try:
            return [m["id"] for m in body["data"]]
        except (KeyError, TypeError):
            raise ChatError(f"{self.url}/v1/models did not answer with a model list") from None

    def stream_chat(self, messages: list[dict], model: str, reply: Reply, **params) -> Iterator[str]:
        """Yield the reply's text pieces as they arrive, filling `reply` (text, finish, usage)."""
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update({k: v for k, v in params.items() if v is not None})
        with self._request("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                _json_or_raise(r)
            for data in _sse_data(r):
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise ChatError(f"the server sent a malformed stream chunk: {data[:80]!r}") from None
                if not isinstance(chunk, dict):
                    raise ChatError(f"the server sent a malformed stream chunk: {data[:80]!r}")
                if "error" in chunk:  # an error after the stream began arrives as a chunk
                    raise ChatError(_error_message(chunk))
                if chunk.get("usage"):
                    reply.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        reply.text += piece
                        yield piece
                    if choice.get("finish_reason"):
                        reply.finish_reason = choice["finish_reason"]
        # Ended with no finish_reason and no [DONE]: cut off (server stopped, proxy timeout).
        if reply.finish_reason is None:
            raise ChatError("the stream ended before the reply was finished")

    @contextlib.contextmanager
    def _request(self, method: str, path: str, **kw) -> Iterator[httpx.Response]:
        """A streamed response; network failures, also while reading it, become one-line ChatErrors."""
        try:
            with self.http.stream(method, path, **kw) as r:
                yield r
        except httpx.HTTPError as e:
            raise ChatError(_transport_message(e, self.url)) from None


def _transport_message(e: httpx.HTTPError, url: str) -> str:
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect to {url}: is the server running? ({e})"
    if isinstance(e, httpx.TimeoutException):
        return f"{url} did not answer in time ({type(e).__name__})"
    return f"connection to {url} failed: {e}"


def _error_message(body) -> str:
    """OpenAI's {"error": {"message": ...}}, else whatever the body says."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in body:  # FastAPI's default error shape, from servers that keep it
            return str(body["detail"])
    return "the server sent no error message"


def _json_or_raise(r: httpx.Response):
    r.read()
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if r.status_code >= 400:
        if body is None and r.text.strip():  # e.g. a proxy's HTML page: its first line says most
            raise ChatError(f"HTTP {r.status_code}: {r.text.strip().splitlines()[0][:200]}")
        raise ChatError(f"{_error_message(body)} (HTTP {r.status_code})")
    if body is None:
        raise ChatError(f"{r.url} did not answer with JSON")
    return body


def _sse_data(r: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream (multi-line data joined per event)."""
    lines: list[str] = []
    for line in r.iter_lines():
        if not line:  # a blank line ends an event
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        # other fields (event:, id:, retry:) and comments (":") carry nothing for us
    if lines:
        yield "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = Parser(
        prog="gpt-chat",
        description=(
            "Chat with a model served by gpt-serve or any OpenAI-compatible server; replies stream "
            "token by token. In the chat: /reset forgets the conversation, /quit leaves."
        ),
    )
    p.add_argument(
        "--url",
        default=env.get("GPT_CHAT_URL") or env.get("OPENAI_BASE_URL") or DEFAULT_URL,
        help="server base URL, with or without /v1 (env GPT_CHAT_URL or OPENAI_BASE_URL; "
        f"default {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        default=env.get("OPENAI_API_KEY") or None,
        help="bearer token, if the server wants one (env OPENAI_API_KEY)",
    )
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    p.add_argument(
        "--temperature",
        "-t",
        type=float_in(0.0, 2.0),
        default=None,
        help="sampling temperature in [0, 2]; 0 is greedy (default: the server's)",
    )
    p.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, lo_open=True),
        default=None,
        help="nucleus sampling mass in (0, 1] (default: the server's)",
    )
    p.add_argument(
        "--max-tokens",
        "-n",
        type=positive_int,
        default=None,
        help="most tokens per reply (default: the server's)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="end a reply when this text appears (repeatable)",
    )
    p.add_argument(
        "--usage",
        action="store_true",
        help="after each reply, print its token counts and finish reason to stderr",
    )
    p.add_argument(
        "--timeout",
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


def chat_loop(client: ChatClient, model: str, args, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    interactive = stdin.isatty()
    show = (lambda text: text.translate(_CONTROLS)) if stdout.isatty() else (lambda text: text)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"gpt-chat: {model} at {client.url}; {HELP}", file=stderr)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    params = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop,
    )
    failed = 0
    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=stderr)
            return 1 if failed else 0
        if not interactive and line == "":  # EOF
            return 1 if failed else 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 1 if failed else 0
        if command == "/reset":
            messages = list(opening)
            print("(conversation reset)", file=stderr)
            continue
        if command == "/help":
            print(HELP, file=stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; {HELP}", file=stderr)
            continue

        messages.append({"role": "user", "content": text})
        reply = Reply()
        stream = client.stream_chat(messages, model, reply, **params)
        try:
            for piece in stream:
                stdout.write(show(piece))
                stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            reply.interrupted = True
        except ChatError as e:
            stdout.write("\n" if reply.text else "")
            stdout.flush()
            print(f"gpt-chat: error: {e}", file=stderr)
            messages.pop()  # the turn failed: the conversation goes on as if it was never sent
            failed += 1
            continue
        finally:
            stream.close()  # closes the connection now, so the server cancels a stopped reply
        stdout.write("\n")
        stdout.flush()
        # The reply (even a stopped one: the user saw it) becomes context for the next turn.
        messages.append({"role": "assistant", "content": reply.text})
        if reply.interrupted:
            print("(reply stopped)", file=stderr)
        elif args.usage:
            print(_usage_line(reply), file=stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a reply the console cannot encode must not end the chat
            stream.reconfigure(errors="replace")
    client = ChatClient(args.url, api_key=args.api_key, timeout=args.timeout)
    try:
        try:
            served = client.models()
        except ChatError as e:
            print(f"gpt-chat: error: {e}", file=sys.stderr)
            return 2
        model = args.model
        if model is None:
            if not served:
                print(f"gpt-chat: error: {client.url} serves no models", file=sys.stderr)
                return 2
            model = served[0]
        elif model not in served:
            print(
                f"gpt-chat: error: model {model!r} is not served at {client.url} "
                f"(it serves: {', '.join(served) or 'nothing'})",
                file=sys.stderr,
            )
            return 2
        return chat_loop(client, model, args, sys.stdin, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
