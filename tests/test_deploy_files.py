"""The Docker and Prometheus files, checked as far as possible without a Docker engine.

No Docker engine runs on these machines, so nothing here builds an image or starts a container.
Instead the files are parsed and held against each other and against the project: the names,
ports, paths, commands and routes they mention must be the ones that exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
MODELS_MOUNT = "/models"


def _interpolate(value):
    """Compose's `${VAR:-default}` as it reads with VAR unset."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)
    return value


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus_config():
    return yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile(instruction: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == instruction]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument; the shell form is split like a shell."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def volumes_of(service: dict) -> list[tuple[str, str]]:
    """(source, target) pairs of the short volume syntax."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes") or []]


def container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports") or []}


def test_compose_defines_server_prometheus_and_a_train_profile(services):
    assert {"server", "prometheus", "train"} <= set(services)
    assert services["server"]["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["train"]["profiles"] == ["train"]
    assert "profiles" not in services["server"] and "profiles" not in services["prometheus"]
    # the train service runs the server's image, so one build serves both
    assert services["train"]["image"] == services["server"]["image"]


def test_prometheus_scrapes_the_server_service_on_its_container_port(services, prometheus_config):
    jobs = prometheus_config["scrape_configs"]
    targets = [
        (job.get("metrics_path", "/metrics"), t)
        for job in jobs
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets, "prometheus.yml scrapes nothing"
    server = services["server"]
    port = int(env_of(server).get("GPT_SERVE_PORT", 8000))
    for path, target in targets:
        host, _, target_port = target.partition(":")
        assert host == "server", f"{target}: not the compose service name"
        assert int(target_port) == port, f"{target}: the server listens on {port}"
        assert path == "/metrics"
    assert port in container_ports(server)
    assert port in {int(p) for p in dockerfile("EXPOSE")[0].split()}


def test_bind_mounted_files_exist_in_the_repository(services):
    mounts = [
        (name, src, dst)
        for name, svc in services.items()
        for src, dst in volumes_of(svc)
        if src.startswith((".", "/"))
    ]
    assert ("prometheus", "./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml") in mounts
    for name, src, _ in mounts:
        assert (ROOT / src).exists(), f"service {name} mounts {src}, which is not in the repository"


def test_train_writes_where_the_server_reads_through_a_shared_volume(compose, services):
    server, train = services["server"], services["train"]
    assert ("models", MODELS_MOUNT) in volumes_of(server)
    assert ("models", MODELS_MOUNT) in volumes_of(train)
    assert "models" in compose["volumes"]
    model_path = env_of(server)["GPT_SERVE_MODEL"]
    argv = train["command"]
    assert argv[0] == "gpt-train"
    out = argv[argv.index("--out") + 1]
    assert out.startswith(MODELS_MOUNT + "/")
    # the server serves the run's best checkpoint, where gpt-train documents it
    assert model_path == out + "/best"
    from training.cli import build_parser

    assert "OUT/best/" in build_parser().format_help()


def test_the_clis_accept_the_container_commands(services):
    from server.cli import build_parser as serve_parser
    from training.cli import build_parser as train_parser

    (cmd,) = dockerfile("CMD")
    serve_parser().parse_args(exec_form(cmd)[1:])  # argparse exits (SystemExit) on a bad flag
    train_parser().parse_args(services["train"]["command"][1:])


def test_the_app_answers_on_the_paths_the_files_name(prometheus_config):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    # No model is loaded (the lifespan does not run outside `with`): these paths answer anyway.
    client = TestClient(create_app(Settings()))
    assert client.get("/health").status_code == 200  # both healthchecks
    for job in prometheus_config["scrape_configs"]:
        r = client.get(job.get("metrics_path", "/metrics"))
        assert r.status_code == 200 and "gptserve_" in r.text
    page = client.get("/")  # the chat page the README sends people to
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_container_commands_are_declared_entry_points(services, pyproject):
    scripts = pyproject["project"]["scripts"]
    (cmd,) = dockerfile("CMD")
    argv = exec_form(cmd)
    assert argv[0] == "gpt-serve" and scripts["gpt-serve"] == "cli_args.launch:serve"
    assert "--host" in argv and argv[argv.index("--host") + 1] == "0.0.0.0"  # reachable from outside
    assert services["train"]["command"][0] in scripts
    # CMD, not ENTRYPOINT: otherwise compose's `command:` for train would be appended to gpt-serve
    assert not dockerfile("ENTRYPOINT")


def test_dockerfile_copies_the_packages_and_what_pip_install_needs(pyproject):
    copied = set()
    for args in dockerfile("COPY"):
        parts = [p for p in exec_form(args) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            copied.add(src.rstrip("/"))
    packages = {
        pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    runs = " ".join(dockerfile("RUN"))
    assert 'pip install ".${EXTRAS:+[$EXTRAS]}"' in runs  # the project, with extras when asked
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in [
        f"ARG {a}" for a in dockerfile("ARG")
    ]
    assert '--index-url "$TORCH_INDEX_URL"' in runs


def test_image_runs_as_a_non_root_user():
    users = dockerfile("USER")
    assert users and users[-1] not in ("root", "0")


def test_web_page_ships_as_package_data(pyproject):
    patterns = pyproject["tool"]["setuptools"]["package-data"]["server"]
    assert any((ROOT / "server").glob(p) for p in patterns)
    assert (ROOT / "server" / "static" / "index.html") in {
        f for p in patterns for f in (ROOT / "server").glob(p)
    }


def test_dockerignore_keeps_environments_vcs_and_data_out():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runs", "data", "**/__pycache__"} <= ignored
    # and nothing the Dockerfile copies is ignored
    for args in dockerfile("COPY"):
        for src in exec_form(args)[:-1]:
            assert src.rstrip("/") not in ignored


def test_healthchecks_ask_health_on_the_server_port(services):
    (check,) = dockerfile("HEALTHCHECK")
    compose_check = " ".join(services["server"]["healthcheck"]["test"])
    for text in (check, compose_check):
        urls = re.findall(r"http://127\.0\.0\.1:[^/'\"]+(/[\w/]*)", text)
        assert urls == ["/health"], text
    assert ":8000/health" in compose_check


@pytest.fixture(scope="module")
def app_port():
    """The app, with no model loaded, under uvicorn on a free loopback port: /health answers."""
    import socket
    import threading
    import time

    import uvicorn

    from server.app import create_app
    from server.config import Settings

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(Settings()), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dockerfile_healthcheck_command_passes_on_a_live_server_and_fails_without_one(app_port):
    (check,) = dockerfile("HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3 :].strip())  # the exec form, as Docker runs it
    assert argv[0] == "python"
    run = [sys.executable, *argv[1:]]
    up = subprocess.run(
        run, env={**os.environ, "GPT_SERVE_PORT": str(app_port)}, capture_output=True, timeout=30
    )
    down = subprocess.run(
        run, env={**os.environ, "GPT_SERVE_PORT": str(_free_port())}, capture_output=True, timeout=30
    )
    assert up.returncode == 0, up.stderr
    assert down.returncode != 0


def test_compose_environment_names_are_server_settings(services):
    import dataclasses

    from server.config import ENV_PREFIX, Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    for name in env_of(services["server"]):
        assert name.startswith(ENV_PREFIX)
        assert name[len(ENV_PREFIX) :].lower() in fields, f"{name} is not a gpt-serve setting"
    Settings.from_env(env_of(services["server"]))  # and their values parse


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    _compose_cli() is None, reason="neither `docker compose` nor `docker-compose` is installed"
)
@pytest.mark.parametrize("profile", [[], ["--profile", "train"]], ids=["default", "train-profile"])
def test_docker_compose_accepts_the_file(profile):
    r = subprocess.run(
        _compose_cli() + ["-f", str(ROOT / "docker-compose.yml"), *profile, "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def _serve_configs() -> list[dict]:
    plain = yaml.safe_load((ROOT / "deploy" / "ray" / "gpt-serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    return [plain, yaml.safe_load(service["spec"]["serveConfigV2"])]


@pytest.mark.parametrize("which", [0, 1], ids=["gpt-serve.yaml", "rayservice.yaml"])
def test_the_ray_serve_configs_are_valid_and_build_the_app(which):
    pytest.importorskip("ray.serve")
    from importlib import import_module

    from ray.serve.schema import ServeDeploySchema

    config = _serve_configs()[which]
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    built = getattr(import_module(module), name)(app["args"])
    assert type(built).__name__ == "Application"


def test_the_ray_prometheus_config_scrapes_the_ingress_metrics():
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = _serve_configs()[0]["http_options"]["port"]
    assert job["static_configs"][0]["targets"] == [f"localhost:{port}"]
