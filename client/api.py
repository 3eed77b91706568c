"""gpt-chat's HTTP side: the few calls it makes to an OpenAI-compatible server (the model list,
gpt-serve's and vLLM's `POST /tokenize`, streamed chat completions), every failure one ChatError."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx


class ChatError(Exception):
    """A failure worth one line to the user: the server's own error message where it sent one,
    and the HTTP status where there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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

    def models(self) -> dict[str, int | None]:
        """The served models' names, each with its context in tokens where the server says it
        (gpt-serve's and vLLM's `max_model_len`; 0 while a model loads counts as unknown)."""
        with self._request("GET", "/models") as r:
            body = _json_or_raise(r)
        try:
            cards = {m["id"]: m.get("max_model_len") for m in body["data"]}
        except (KeyError, TypeError, AttributeError):
            raise ChatError(f"{self.url}/v1/models did not answer with a model list") from None
        return {name: n if isinstance(n, int) and n > 0 else None for name, n in cards.items()}

    def count_tokens(self, messages: list[dict], model: str) -> tuple[int, int | None] | None:
        """(prompt tokens, the model's context) of `messages` as the server renders them for a chat
        turn: gpt-serve's (and vLLM's) `POST /tokenize`. None where the server has no such route."""
        with self._request("POST", self.url + "/tokenize", json={"model": model, "messages": messages}) as r:
            if r.status_code in (404, 405, 501):
                return None
            body = _json_or_raise(r)
        count, context = (body.get("count"), body.get("max_model_len")) if isinstance(body, dict) else (0, 0)
        if not isinstance(count, int):
            return None
        return count, context if isinstance(context, int) and context > 0 else None

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
            raise ChatError(f"HTTP {r.status_code}: {r.text.strip().splitlines()[0][:200]}", r.status_code)
        raise ChatError(f"{_error_message(body)} (HTTP {r.status_code})", r.status_code)
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
