"""gpt-serve: options and environment, one-line errors, and SIGTERM draining in a real process."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import save_tiny, tiny_settings

from server.app import load_engine
from server.cli import build_parser, main

OPTIONS = [
    "--model",
    "--speculative",
    "--num-speculative-tokens",
    "--draft-model",
    "--host",
    "--port",
    "--served-model-name",
    "--api-key",
    "--max-batch-size",
    "--max-queue",
    "--max-prompt-tokens",
    "--default-max-tokens",
    "--timeout",
    "--drain-grace",
    "--chat-template",
    "--device",
    "--dtype",
    "--kv-cache-dtype",
    "--quantize",
    "--log-level",
    "--no-prefix-cache",
    "--max-body-bytes",
    "--body-timeout",
    "--max-connections",
    "--keep-alive-timeout",
    "--allowed-origins",
    "--no-docs",
    "--replicas",
    "--min-replicas",
    "--max-replicas",
    "--cpus-per-replica",
    "--routing",
]


@pytest.fixture(scope="module")
def other_tokenizer_checkpoint(tmp_path_factory) -> str:
    """A tiny GPT with GPT-2's tokenizer: the tiny model's (byte-level) is another."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-gpt2-tok", tokenizer="gpt2", vocab_size=50257)


def test_help_documents_every_option_and_its_environment_variable():
    text = build_parser().format_help()
    for opt in OPTIONS:
        assert opt in text
        env = "GPT_SERVE_" + opt[2:].upper().replace("-", "_").removeprefix("NO_")  # --no-x: GPT_SERVE_X=0
        assert env in text.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        ([], {}, "--model PATH is required"),
        (["--model", "/no/such/dir"], {}, "no such checkpoint directory"),
        (["--model", "x", "--port", "abc"], {}, "invalid int value"),
        (["--model", "x", "--port", "70000"], {}, "--port (GPT_SERVE_PORT) must be in"),
        (
            ["--model", "x", "--max-batch-size", "0"],
            {},
            "--max-batch-size (GPT_SERVE_MAX_BATCH_SIZE) must be >= 1",
        ),
        (["--model", "x", "--dtype", "int8"], {}, "invalid choice"),
        (["--model", "x", "--quantize", "int4"], {}, "invalid choice"),
        (["--model", "x", "--kv-cache-dtype", "int8"], {}, "invalid choice"),
        (["--model", "x"], {"GPT_SERVE_KV_CACHE_DTYPE": "fp8"}, "GPT_SERVE_KV_CACHE_DTYPE"),
        (["--model", "x"], {"GPT_SERVE_QUANTIZE": "int4"}, "GPT_SERVE_QUANTIZE"),
        (["--model", "x"], {"GPT_SERVE_MAX_QUEUE": "lots"}, "GPT_SERVE_MAX_QUEUE"),
        (["--model", "x", "--chat-template", "/no/template.json"], {}, "cannot read the chat template"),
        (["--model", "x", "--device", "nonsense"], {}, "--device"),
        (["--model", "x", "--speculative", "maybe"], {}, "invalid choice"),
        (["--model", "x", "--speculative", "draft"], {}, "needs a draft model"),
        (["--model", "x", "--num-speculative-tokens", "0"], {}, "--num-speculative-tokens"),
        (
            ["--model", "x", "--draft-model", "/no/such/dir"],
            {},
            "--draft-model /no/such/dir: /no/such/dir: no such checkpoint",
        ),
        (["--model", "x", "--draft-model", "s2s"], {}, "decoder-only"),
        (
            ["--model", "x", "--draft-model", "gpt2-tokenizer"],
            {},
            "a draft model must share the model's tokenizer",
        ),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(
    monkeypatch, capsys, tiny_checkpoint, tiny_s2s_checkpoint, other_tokenizer_checkpoint, argv, env, fragment
):
    for key in [k for k in os.environ if k.startswith("GPT_SERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    paths = {"x": tiny_checkpoint, "s2s": tiny_s2s_checkpoint, "gpt2-tokenizer": other_tokenizer_checkpoint}
    argv = [paths.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt-serve: error: ") and fragment in err


@pytest.mark.slow
def test_sigterm_drains_running_streams_then_exits_0(long_checkpoint, tmp_path):
    env = {**os.environ, "GPT_SERVE_LOG_LEVEL": "warning", "GPT_SERVE_DRAIN_GRACE": "60"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            long_checkpoint,
            "--port",
            "0",
            "--served-model-name",
            "m",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        banner = proc.stdout.readline()
        url = banner.split(" at ")[1].split()[0]
        assert httpx.get(url + "/ready").status_code == 200
        body = {
            "model": "m",
            "prompt": "drain",
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := httpx.get(url + "/ready")).status_code == 200:
                assert time.monotonic() < deadline, "/ready never turned 503"
                time.sleep(0.01)
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
            refused = httpx.post(
                url + "/v1/completions", json={"model": "m", "prompt": "late", "max_tokens": 2}
            )
            assert refused.status_code == 503
            events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == 1500  # the running stream finished, not cut
        reasons = [
            c["finish_reason"]
            for e in events[:-2]
            for c in json.loads(e[6:])["choices"]
            if c["finish_reason"]
        ]
        assert reasons == ["length"]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# Runs gpt-serve with a scheduler whose step fails once a request arrives, and whose recovery
# fails too: the engine thread dies.
_DYING_SERVER = """
import sys
import server.scheduler as s

def broken(self, *args, **kwargs):
    raise RuntimeError("simulated corruption")

step = s.Scheduler.step
s.Scheduler.step = lambda self, **kw: broken(self) if kw.get("admit") else step(self, **kw)
s.Scheduler.fail_all = broken
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dead_engine_fails_the_request_and_the_process_exits_1(tiny_checkpoint, tmp_path):
    env = {**os.environ, "GPT_SERVE_LOG_LEVEL": "warning"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_SERVER, "--model", tiny_checkpoint, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0]
        assert httpx.get(url + "/ready").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code in (500, 503) and "error" in r.json()
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "the engine stopped" in (tmp_path / "server.log").read_text()


def test_a_dead_engine_makes_ready_503(tiny_checkpoint, server_factory):
    settings = tiny_settings(tiny_checkpoint)
    server = server_factory(settings, engine=load_engine(settings))
    server.engine._die("RuntimeError: simulated")
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_dead"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_the_served_name_is_the_runs_and_settings_errors_name_flags(tmp_path):
    import gpt
    from server.cli import _as_flags
    from server.config import Settings

    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), tmp_path / "default" / "best")
    assert Settings(model=str(tmp_path / "default" / "best")).model_name == "default"
    assert Settings(model=str(tmp_path / "default")).model_name == "default"
    assert Settings(model=str(tmp_path / "default"), served_model_name="mine").model_name == "mine"
    assert _as_flags("max_batch_size must be >= 1, got 0") == (
        "--max-batch-size (GPT_SERVE_MAX_BATCH_SIZE) must be >= 1, got 0"
    )
