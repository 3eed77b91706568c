"""Fixtures for the server tests: a tiny checkpoint and a real uvicorn server on a loopback port.

    def test_x(live_server, openai_client):
        openai_client.completions.create(model=live_server.model, prompt="hi", max_tokens=4)

`start_server(settings, engine=None)` (the `server_factory` fixture) starts further servers with
their own settings, stopped at the end of the test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import torch
import uvicorn

import gpt
from server.app import create_app, load_engine
from server.config import Settings

TINY_MODEL_NAME = "tiny-gpt"
TINY_CONTEXT = 128  # gpt-tiny's 64 tokens hardly fit a chat prompt and a reply


@dataclass
class LiveServer:
    url: str
    api_key: str | None
    app: Any
    engine: Any
    model: str  # the served model name
    _server: uvicorn.Server = None
    _thread: threading.Thread = None

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's event loop (where the engine's handles live)."""
        loop = self._server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def start_live_server(settings: Settings, engine=None) -> LiveServer:
    """Run `create_app(settings, engine=...)` under uvicorn in a background thread."""
    app = create_app(settings, engine=engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return LiveServer(
        url=f"http://127.0.0.1:{port}",
        api_key=settings.api_key,
        app=app,
        engine=app.state.engine,
        model=settings.model_name,
        _server=server,
        _thread=thread,
    )


def save_tiny(path, preset: str = "gpt-tiny", seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    model = gpt.build_model(gpt.preset(preset, **overrides)).eval()
    gpt.save(model, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A gpt-tiny model (byte tokenizer, TINY_CONTEXT tokens of context) saved with gpt.save."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / TINY_MODEL_NAME, block_size=TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_s2s_checkpoint(tmp_path_factory) -> str:
    """A seq2seq-tiny encoder-decoder (byte tokenizer) saved with gpt.save."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-s2s", preset="seq2seq-tiny")


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory) -> str:
    """gpt-tiny with a 2048-token context: requests that run long enough to be caught running."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-long", block_size=2048)


def tiny_settings(checkpoint: str, **overrides) -> Settings:
    return Settings(model=checkpoint, served_model_name=TINY_MODEL_NAME, **overrides)


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint):
    """The tiny GPT served on 127.0.0.1:<free port>, no API key, for the whole test module."""
    settings = tiny_settings(tiny_checkpoint, max_batch_size=8, max_queue=64)
    server = start_live_server(settings, engine=load_engine(settings))
    yield server
    server.stop()


@pytest.fixture
def paced_live_server(live_server, monkeypatch):
    """live_server whose engine waits 20 ms per forward and token of a row (a speculative step
    verifies several) for this test. The engine merges tokens a reader has not collected yet
    into one piece, and the tiny model can finish a whole reply before a busy event loop reads
    once: tests that count streamed pieces need tokens spaced."""
    step = live_server.engine.model.step

    def paced_step(tokens, *args, **kwargs):
        time.sleep(0.02 * tokens.shape[1])
        return step(tokens, *args, **kwargs)

    monkeypatch.setattr(live_server.engine.model, "step", paced_step)
    return live_server


@pytest.fixture
def server_factory():
    """start(settings, engine=None) -> LiveServer; every server started is stopped afterwards."""
    started = []

    def start(settings: Settings, engine=None) -> LiveServer:
        server = start_live_server(settings, engine=engine)
        started.append(server)
        # without an engine the lifespan loads the model in the background: wait for it, or a
        # test's first request may race the load and get "still loading"
        deadline = time.monotonic() + 60
        while server.app.state.engine is None and server.app.state.load_error is None:
            assert time.monotonic() < deadline, "the model never finished loading"
            time.sleep(0.01)
        return server

    yield start
    for server in started:
        server.stop()


def make_client(server: LiveServer, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=api_key or server.api_key or "no-key", max_retries=0, timeout=60
    )


@pytest.fixture
def openai_client(live_server) -> openai.OpenAI:
    return make_client(live_server)
