"""The README's main command: ./start.sh trains the default model once, then serves it."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv/bin/gpt-serve").exists(),
    reason="start.sh uses the project's .venv (made by .ci/run or a first ./start.sh)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, *args: str):
    env = {**os.environ, "GPT_DEFAULT_RUN": str(run_dir), "GPT_DEFAULT_ITERS": "4"}
    env.pop("GPT_SERVE_MODEL", None)
    return subprocess.Popen(
        ["bash", str(ROOT / "start.sh"), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_url(proc, limit: float = 300.0) -> tuple[str, list[str]]:
    """Read the output until gpt-serve prints its URL; return it and the lines before it."""
    lines, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("start.sh ended before serving:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("gpt-serve: serving"):
            return line.split(" at ")[1].split()[0], lines
    pytest.fail("start.sh did not serve in time:\n" + "".join(lines))


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


@pytest.mark.slow
def test_start_trains_the_default_model_once_then_serves_it_with_the_chat_page(tmp_path):
    run = tmp_path / "default"
    port = _free_port()
    proc = _start(run, "--port", str(port))
    try:
        url, lines = _wait_for_url(proc)
        assert url == f"http://127.0.0.1:{port}"
        assert any("training the default model" in line for line in lines)
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["default"]
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert "<html" in r.read().decode().lower()
        out = _post(url + "/v1/completions", {"model": "default", "prompt": "def f(x):", "max_tokens": 5})
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        assert _stop(proc) == 0
    assert (run / "DONE").exists() and (run / "best" / "config.json").exists()

    # The second start reuses the trained model: no training, straight to serving.
    proc = _start(run, "--port", str(_free_port()))
    try:
        _, lines = _wait_for_url(proc, limit=120)
        assert not any("train" in line for line in lines)
        # no request first: a SIGTERM right after the URL is printed must still drain and exit 0
    finally:
        assert _stop(proc) == 0
