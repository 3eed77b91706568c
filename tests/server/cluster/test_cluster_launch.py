"""`gpt-serve --replicas`: what the user must fix is one line and exit 2, a model that fails on
its replicas exit 1, and nothing is left running either way."""

import subprocess
import sys
import time

import pytest
from conftest import save_tiny

from server.cluster.launch import (
    LaunchError,
    _deploy_failure,
    _proxy_port,
    direct_ingress_env,
    replica_resources,
)
from server.config import Settings


def _serve(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, list[str]]:
    """Run gpt-serve in a session of its own: its exit code, stderr, and what of the session
    (Ray's processes) outlived it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    _, err = proc.communicate(timeout=timeout)
    time.sleep(1)
    out = subprocess.run(["ps", "-eo", "sid=,pid=,comm="], capture_output=True, text=True).stdout
    left = [line for line in out.splitlines() if line.split()[0] == str(proc.pid)]
    return proc.returncode, err, left


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_cpus_are_shared_evenly_unless_given():
    assert replica_resources(Settings(replicas=2), 8) == (4.0, 0.0)
    assert replica_resources(Settings(replicas=3), 8) == (2.0, 0.0)
    assert replica_resources(Settings(replicas=2, cpus_per_replica=1.5), 8) == (1.5, 0.0)
    assert replica_resources(Settings(replicas=1, max_replicas=4), 8) == (2.0, 0.0)
    assert replica_resources(Settings(replicas=2, device="cuda"), 8) == (1.0, 1.0)


def test_more_replicas_than_cpus_is_refused():
    with pytest.raises(LaunchError, match="needs 6 CPUs; the Ray cluster has 4"):
        replica_resources(Settings(replicas=3, cpus_per_replica=2), 4)
    with pytest.raises(LaunchError, match="needs 5 CPUs"):
        replica_resources(Settings(replicas=1, max_replicas=5), 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-replicas", "2"], "--min-replicas (GPT_SERVE_MIN_REPLICAS) needs max_replicas"),
        (["--replicas", "2", "--max-replicas", "1"], "--max-replicas (GPT_SERVE_MAX_REPLICAS) must be >= 1"),
        (["--replicas", "-1"], "--replicas (GPT_SERVE_REPLICAS) must be >= 0"),
        (["--replicas", "1", "--model", "/no/such/model"], "--model /no/such/model: no such file"),
    ],
)
def test_bad_cluster_options_are_one_line_and_exit_2(args, message):
    code, err, left = _serve(*(["--model", "."] if "--model" not in args else []), *args)
    assert code == 2 and message in _last_line(err) and not left, err


def test_missing_ray_says_how_to_install_it(tmp_path):
    code = "import sys; sys.modules['ray'] = None; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model", str(tmp_path), "--replicas", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "pip install 'gpt-serve[ray]'" in _last_line(proc.stderr)


@pytest.mark.slow
def test_a_cluster_without_the_cpus_asked_for_exits_2_and_stops(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny")
    code, err, left = _serve("--model", ckpt, "--replicas", "1", "--cpus-per-replica", "4096")
    assert code == 2 and "needs 4096 CPUs" in _last_line(err) and not left, err


def test_no_cluster_at_ray_address_exits_2(tmp_path, monkeypatch):
    import os

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    code, err, left = _serve("--model", str(tmp_path), "--replicas", "1", env=env)
    assert code == 2 and "no Ray cluster at RAY_ADDRESS=127.0.0.1:9" in _last_line(err) and not left, err


def test_a_model_that_is_no_model_exits_2_before_ray_starts(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"not": "a model"}')
    code, err, left = _serve("--model", str(bad), "--replicas", "1")
    line = _last_line(err)
    assert code == 2 and f"--model {bad}" in line and "expected a gpt-checkpoint checkpoint" in line, err
    assert not left


def test_a_replica_that_fails_to_start_is_reported_by_its_last_error_line():
    """What Serve says when a replica's constructor raised (a model whose weights do not load on
    that node): the last line naming an error, not pages of traceback."""
    message = (
        "Deploying application gpt-serve failed: Failed to update the deployments ['model'].\n"
        '  File "/x/server/cluster/deployment.py", line 60, in __init__\n'
        "    self.engine = await asyncio.to_thread(load_engine, self.settings, None, threads)\n"
        "gpt.files.CheckpointError: /m/model.safetensors: truncated (4 of 548 MB)\n"
    )
    assert (
        _deploy_failure(RuntimeError(message))
        == "gpt.files.CheckpointError: /m/model.safetensors: truncated (4 of 548 MB)"
    )


def test_with_direct_ingress_the_ingress_gets_the_port_and_serves_proxy_another(monkeypatch):
    env = direct_ingress_env(18000)
    ports = env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]
    assert ports == ("18000", "18001")  # a range of one port: --port
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _proxy_port("127.0.0.1", 18000) != 18000
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")  # the user's own choice: the proxy's port
    assert _proxy_port("127.0.0.1", 18000) == 18000
