"""gpt-serve: serve a checkpoint (or a Hugging Face GPT-2 directory) over an OpenAI-compatible API.

Every option can also come from the environment (GPT_SERVE_MODEL, GPT_SERVE_PORT, ...); an
option on the command line wins. SIGTERM (or Ctrl-C) drains: /ready turns 503, new requests
get 503, running ones finish within --drain-grace seconds, then the process exits with 0.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Sequence

import uvicorn

from cli_args import Parser

from .config import (
    DTYPES,
    ENV_PREFIX,
    KV_CACHE_DTYPES,
    LOG_LEVELS,
    QUANTIZATIONS,
    ROUTINGS,
    SPECULATIVE_MODES,
    Settings,
)

log = logging.getLogger("server")


def _opt(p: argparse.ArgumentParser, flag: str, help: str, **kw) -> None:
    field = flag.lstrip("-").replace("-", "_")
    default = Settings.__dataclass_fields__[field].default
    shown = "" if default is None else f"; default {default}"
    p.add_argument(
        flag, dest=field, default=None, help=f"{help} (env {ENV_PREFIX}{field.upper()}{shown})", **kw
    )


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt-serve",
        description=(
            "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models) with streaming, continuous batching, Prometheus /metrics and a web page at / "
            "(completion and chat). "
            "PATH is a checkpoint directory (gpt-train / gpt.save; a run directory serves its best/) or a "
            "Hugging Face GPT-2 directory. "
            "Every option can be given as an environment variable instead; the command line wins."
        ),
        epilog="SIGTERM drains: /ready turns 503, running requests finish within --drain-grace, exit 0.",
    )
    _opt(p, "--model", "checkpoint or GPT-2 directory to serve", metavar="PATH")
    _opt(p, "--host", "address to listen on; 0.0.0.0 for every interface")
    _opt(p, "--port", "TCP port", type=int)
    _opt(
        p,
        "--served-model-name",
        "the model name clients use; default: the run's name (default for runs/default/best), else "
        "the directory's",
        metavar="NAME",
    )
    _opt(
        p,
        "--api-key",
        "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize",
        metavar="KEY",
    )
    _opt(p, "--max-batch-size", "requests decoded together (KV-cache slots)", type=int, metavar="N")
    _opt(p, "--max-queue", "requests that may wait for a slot; beyond that, 429", type=int, metavar="N")
    _opt(
        p,
        "--max-prompt-tokens",
        "longest prompt accepted; default: the model's context",
        type=int,
        metavar="N",
    )
    _opt(p, "--default-max-tokens", "max_tokens when a request gives none", type=int, metavar="N")
    _opt(p, "--timeout", "seconds a request may take, queueing included", type=float, metavar="S")
    _opt(p, "--drain-grace", "seconds running requests get to finish after SIGTERM", type=float, metavar="S")
    _opt(
        p,
        "--chat-template",
        "JSON chat template (docs/chat-template.md); default: System:/User:/Assistant: lines. "
        "Given, it marks the model a chat model: /v1/models suggests chat mode, the web page opens in it",
        metavar="FILE",
    )
    _opt(p, "--device", "torch device, e.g. cpu or cuda")
    _opt(p, "--dtype", "weights' dtype; default: as stored", choices=DTYPES)
    _opt(
        p,
        "--kv-cache-dtype",
        "dtype the KV cache stores keys and values in; default auto: float16 where our attention "
        "kernel reads halves (a CPU with F16C, float32 weights, a GPT), else the model's",
        choices=KV_CACHE_DTYPES,
    )
    _opt(
        p,
        "--quantize",
        "int8: 8-bit weights (and activations) in every linear layer",
        choices=QUANTIZATIONS,
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"torch.compile the decode step at start-up (tens of seconds the first time); default: "
        f"on a CPU where a C++ compiler is found (env {ENV_PREFIX}COMPILE=1/0)",
    )
    _opt(
        p,
        "--speculative",
        "speculative decoding, which never changes the output: auto (default) drafts from prompt "
        "lookup and requests' predictions where measured faster; ngram always; off never",
        choices=SPECULATIVE_MODES,
    )
    _opt(
        p,
        "--draft-model",
        "a smaller GPT with the same tokenizer (checkpoint or Hugging Face GPT-2 directory) that "
        "drafts for --model; auto and draft use it",
        metavar="PATH",
    )
    _opt(
        p,
        "--num-speculative-tokens",
        "the longest draft of a sequence decoding alone (default 32); rows of a batch draft at most 16",
        type=int,
        metavar="N",
    )
    p.add_argument(
        "--eager",
        dest="eager",
        action="store_true",
        default=None,
        help=f"on a GPU, run the decode step eagerly; by default it replays CUDA graphs recorded at "
        f"start-up (env {ENV_PREFIX}EAGER=1)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help=f"prefill every prompt in full instead of reusing cached prefixes of earlier ones "
        f"(env {ENV_PREFIX}PREFIX_CACHE=0)",
    )
    _opt(p, "--max-body-bytes", "larger request bodies get 413 before they are read", type=int, metavar="N")
    _opt(p, "--body-timeout", "seconds a request body may take to arrive; then 408", type=float, metavar="S")
    _opt(
        p,
        "--constraint-timeout",
        "seconds a structured-output constraint (schema, regex, grammar) may take to compile; then 400",
        type=float,
        metavar="S",
    )
    _opt(
        p,
        "--max-connections",
        "open connections at most; beyond that new ones get 503",
        type=int,
        metavar="N",
    )
    _opt(
        p, "--keep-alive-timeout", "seconds an idle keep-alive connection stays open", type=float, metavar="S"
    )
    _opt(
        p,
        "--allowed-origins",
        "comma-separated origins whose pages may call the API (CORS), '*' for any; default: none",
        metavar="ORIGINS",
    )
    p.add_argument(
        "--no-docs",
        dest="docs",
        action="store_false",
        default=None,
        help=f"do not serve /docs, /redoc and /openapi.json (env {ENV_PREFIX}DOCS=0); with --api-key "
        f"they need the key",
    )
    _opt(
        p,
        "--replicas",
        "serve from N replicas on Ray Serve (a local Ray cluster, or the one RAY_ADDRESS names), with "
        "prefix-aware routing; 0 is this one process. Needs pip install 'gpt-serve[ray]'",
        type=int,
        metavar="N",
    )
    _opt(
        p,
        "--min-replicas",
        "with --max-replicas: the fewest replicas autoscaling keeps",
        type=int,
        metavar="N",
    )
    _opt(
        p,
        "--max-replicas",
        "autoscale on Ray Serve up to N replicas on requests in flight (half a batch per replica)",
        type=int,
        metavar="N",
    )
    _opt(
        p,
        "--cpus-per-replica",
        "CPUs (and torch threads) each replica gets; default: the cluster's shared evenly",
        type=float,
        metavar="N",
    )
    _opt(
        p,
        "--routing",
        "with replicas: prefix sends a request where its prompt's prefix is cached unless that replica "
        "is much busier; round-robin in turn",
        choices=ROUTINGS,
    )
    _opt(p, "--log-level", "logging level", choices=LOG_LEVELS)
    return p


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before uvicorn shuts down.

    Uvicorn's own handling would stop listening and wait for open connections, but /ready would
    keep saying 200 meanwhile, and it re-raises the signal at exit (status -15, not 0)."""

    def __init__(self, config: uvicorn.Config, app, banner: str = ""):
        super().__init__(config)
        self.app, self.banner = app, banner
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.exit_code = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.banner and self.started:  # printed once signals are ours: a SIGTERM from here on drains
            print(self.banner, flush=True)

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):  # a signal handler: hand the work to the event loop
        if self._loop is None or self._draining:
            self.should_exit = self.force_exit = True  # a second signal: stop now
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._begin_drain, sig)

    def engine_died(self, reason: str) -> None:
        """The engine thread is gone (called from it): stop serving and exit with 1, so that a
        supervisor (systemd, Docker, Kubernetes) restarts the process."""
        self.exit_code = 1
        self.should_exit = True

    def _begin_drain(self, sig) -> None:
        log.info(
            "received %s: draining (grace %.0fs)",
            signal.Signals(sig).name,
            self.app.state.settings.drain_grace,
        )
        self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        from .app import drain

        try:
            await drain(self.app)
        finally:
            self.should_exit = True


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listen now, not when uvicorn starts: a client that connects as soon as the address is
        # printed waits in the backlog instead of being refused
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _as_flags(message: str) -> str:
    """A settings error as the user named the setting: `max_batch_size must be >= 1` reads
    `--max-batch-size (GPT_SERVE_MAX_BATCH_SIZE) must be >= 1`."""
    field = message.split(" ", 1)[0]
    if field in Settings.__dataclass_fields__:
        flag = "--" + field.replace("_", "-")
        return f"{flag} ({ENV_PREFIX}{field.upper()}){message[len(field) :]}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**vars(args))
    except ValueError as e:
        parser.error(_as_flags(str(e)))
    if not settings.model:
        parser.error(f"--model PATH is required (or set {ENV_PREFIX}MODEL)")

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.on_ray:
        return _serve_on_ray(parser, settings)
    import torch

    from gpt.device import resolve_device
    from gpt.draft_model import DraftModelError

    from .app import create_app, load_engine
    from .chat_template import load_chat_template

    try:
        load_chat_template(settings.chat_template)
    except ValueError as e:
        parser.error(f"--chat-template: {e}")
    try:
        resolve_device(settings.device)
    except ValueError as e:
        parser.error(f"--device {e}")
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as e:
        parser.error(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
    # The engine thread runs every forward pass. OpenMP gives each thread that calls into torch
    # its own team of worker threads, and once a process has more of those than CPUs, libgomp's
    # workers stop spin-waiting between kernels: measured here, a batch-1 decode ran ~9% slower
    # on a second thread than on the main one. So the main thread stays single-threaded (it only
    # loads the model) and the engine thread gets all the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = load_engine(settings, threads=threads)
    except DraftModelError as e:
        sock.close()
        parser.error(f"--draft-model {settings.draft_model}: {e}")
    except (OSError, ValueError) as e:
        sock.close()
        parser.error(f"--model {settings.model}: {e}")

    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        lifespan="on",
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_graceful_shutdown=max(5, int(settings.drain_grace) + 5),
    )
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server = DrainingServer(
        config,
        app,
        banner=f"gpt-serve: serving {settings.model_name!r} at "
        f"http://{shown_host}:{sock.getsockname()[1]} (web page at /, API at /v1)",
    )
    engine.on_death = server.engine_died
    server.run(sockets=[sock])
    if server.exit_code:
        print(
            f"gpt-serve: the engine stopped ({engine.dead}); exiting with {server.exit_code}", file=sys.stderr
        )
    return server.exit_code


def _serve_on_ray(parser: argparse.ArgumentParser, settings: Settings) -> int:
    from .chat_template import load_chat_template
    from .cluster.launch import LaunchError, run

    try:
        load_chat_template(settings.chat_template)
    except ValueError as e:
        parser.error(f"--chat-template: {e}")
    try:
        return run(settings)
    except LaunchError as e:
        if e.exit_code == 2:
            parser.error(str(e))
        print(f"gpt-serve: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
