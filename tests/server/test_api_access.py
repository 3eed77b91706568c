"""What reaches the API at all: body size, content type and arrival time are vetted before a
route runs (413, 415, 408); CORS lets only the configured origins in; with an API key the
schema and docs pages need it too."""

import socket
import time

import httpx
import pytest
from conftest import start_live_server, tiny_settings
from test_api_errors import COMPLETIONS, assert_error, wait_for_idle

from server.app import load_engine


@pytest.fixture(scope="module")
def small_body_server(tiny_checkpoint):
    settings = tiny_settings(tiny_checkpoint, max_body_bytes=4096, body_timeout=1.0)
    server = start_live_server(settings, engine=load_engine(settings))
    yield server
    server.stop()


def _raw_request(url: str, head: bytes, body_parts=(), pause: float = 0.0) -> bytes:
    """Send a hand-written request (possibly slowly) and return what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        try:
            for part in body_parts:
                time.sleep(pause)
                s.sendall(part)
        except OSError:  # the server answered and closed early: that is the point
            pass
        s.settimeout(10)
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            out += data
    return out


def test_a_body_over_the_limit_is_413_before_it_is_read(small_body_server):
    r = httpx.post(small_body_server.url + COMPLETIONS, json={"prompt": "x" * 5000, "max_tokens": 1})
    assert_error(r, 413, code="request_too_large")
    # a declared length over the limit is refused without sending the body at all
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 30000000\r\n\r\n"
    )
    answer = _raw_request(small_body_server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"request_too_large" in answer


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(small_body_server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 1000
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 10 + [b"0\r\n\r\n"]
    answer = _raw_request(small_body_server.url, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_a_body_within_the_limit_is_served(small_body_server):
    r = httpx.post(small_body_server.url + COMPLETIONS, json={"prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_a_body_that_trickles_in_is_408(small_body_server):
    body = b'{"prompt": "hello", "max_tokens": 1}'
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answer = _raw_request(
        small_body_server.url, head, [body[i : i + 4] for i in range(0, len(body), 4)], pause=0.2
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"request_timeout" in answer
    wait_for_idle(small_body_server)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_post_that_is_not_json_is_415(live_server, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(
        live_server.url + COMPLETIONS, content=b'{"prompt": "x", "max_tokens": 1}', headers=headers
    )
    assert_error(r, 415, code="unsupported_media_type")


def test_json_with_a_charset_is_accepted(live_server):
    r = httpx.post(
        live_server.url + COMPLETIONS,
        content=b'{"prompt": "x", "max_tokens": 1}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


def test_cors_is_closed_by_default(live_server):
    r = httpx.options(
        live_server.url + COMPLETIONS,
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(live_server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_allowed_origins_get_cors_and_others_do_not(tiny_checkpoint, server_factory):
    server = server_factory(
        tiny_settings(tiny_checkpoint, allowed_origins="https://app.example, http://localhost:3000")
    )
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(server.url + COMPLETIONS, headers={"Origin": "https://app.example", **preflight})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(server.url + COMPLETIONS, headers={"Origin": "https://evil.example", **preflight})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(
        server.url + COMPLETIONS,
        json={"prompt": "x", "max_tokens": 1},
        headers={"Origin": "http://localhost:3000"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_with_an_api_key_the_schema_and_docs_need_it(tiny_checkpoint, server_factory):
    server = server_factory(tiny_settings(tiny_checkpoint, api_key="s3cret"))
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert_error(httpx.get(server.url + path), 401)
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, path
    assert (
        "/v1/completions"
        in httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()["paths"]
    )


def test_without_a_key_the_docs_are_open_unless_turned_off(tiny_checkpoint, server_factory, live_server):
    assert httpx.get(live_server.url + "/openapi.json").status_code == 200
    server = server_factory(tiny_settings(tiny_checkpoint, docs=False))
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert_error(httpx.get(server.url + path), 404)


def test_every_post_route_is_vetted_as_json(live_server):
    from server.routes_system import JSON_BODY_PATHS

    paths = httpx.get(live_server.url + "/openapi.json").json()["paths"]
    posts = {path for path, ops in paths.items() if "post" in ops}
    assert posts == JSON_BODY_PATHS


def test_a_post_to_a_get_route_is_405_not_415(live_server):
    assert_error(httpx.post(live_server.url + "/health", content=b"x"), 405)
