"""`gpt-serve --replicas N`: the same server as N replicas on Ray Serve, from one command.

Starts a local Ray cluster (or joins the one RAY_ADDRESS names), checks that it has the CPUs the
replicas ask for, deploys `deployment.build_app` behind Serve's HTTP proxy on --host/--port, and
waits. SIGTERM or Ctrl-C deletes the app, which drains every replica's streams within
--drain-grace, and stops the local cluster; nothing is left running after an error either.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading

from ..config import Settings

log = logging.getLogger("server")


class LaunchError(Exception):
    """A one-line reason the cluster cannot serve; `exit_code` 2 for configuration, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def replica_resources(settings: Settings, cluster_cpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) each replica asks Ray for. Without --cpus-per-replica the cluster's CPUs are
    shared evenly between the most replicas there may be."""
    most = settings.max_replicas or settings.replicas
    gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    if settings.cpus_per_replica is not None:
        cpus = settings.cpus_per_replica
    elif gpus:
        cpus = 1.0
    else:
        cpus = max(1.0, math.floor(cluster_cpus / most))
    if most * cpus > cluster_cpus:
        raise LaunchError(
            f"--replicas {most} x {cpus:g} CPUs needs {most * cpus:g} CPUs; the Ray cluster has "
            f"{cluster_cpus:g} (lower --replicas/--max-replicas or --cpus-per-replica)"
        )
    return cpus, gpus


# Ray Serve's settings for latency over isolation (a subset of its RAY_SERVE_THROUGHPUT_OPTIMIZED
# mode): user code and the handles' router on the replicas' own event loops instead of a thread
# each, and access logs written in batches. Set for the local cluster this command starts; a
# user's own values win.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress (the rest of RAY_SERVE_THROUGHPUT_OPTIMIZED): the ingress replica
    serves HTTP on `port` itself, so a streamed token crosses one Ray hop, not two (Serve's proxy
    no longer relays it). The port range is that one port; Serve still starts a proxy on the
    head node, which gets another. No load balancer sits in front of a local cluster, so a
    stopping ingress waits for its streams but not the draining period one would need."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A RAY_ADDRESS of host:port that nothing answers on is an error now; ray.init would retry
    connecting for minutes. Other forms (auto, ray://) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise LaunchError(f"no Ray cluster at RAY_ADDRESS={address}: {e.strerror or e}") from None


def _deploy_failure(error: Exception) -> str:
    """Serve's deploy error is pages of traceback; its last meaningful line says why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if "Error:" in line and not line.startswith("File ")]
    return (reasons or lines or [type(error).__name__])[-1]


def _replica_failure(serve, app_name: str) -> str | None:
    """Why the model's replicas failed to start, from the deployment's status message."""
    try:
        app = serve.status().applications.get(app_name)
        message = app.deployments["model"].message if app is not None else ""
    except Exception:  # the status is a nicety; the caller has a reason of its own
        return None
    return _deploy_failure(RuntimeError(message)) if message else None


def run(settings: Settings) -> int:
    """Serve until a signal; raises LaunchError for what the user must fix."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LaunchError("--replicas needs Ray Serve: pip install 'gpt-serve[ray]'") from None
    from .deployment import APP_NAME, build_app

    if settings.model and "://" not in settings.model and not os.path.exists(settings.model):
        raise LaunchError(f"--model {settings.model}: no such file or directory")
    address = os.environ.get("RAY_ADDRESS") or None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our banner says what its INFO lines do
    port = settings.port or _free_port(settings.host)
    if address:
        check_reachable(address)
    else:
        # the replicas of a local cluster read the model where this process can: a model that
        # is no model is an error now, not after Ray has started and a replica has failed
        from gpt.checkpoint import check_header

        try:
            check_header(settings.model)
        except (OSError, ValueError) as e:
            raise LaunchError(f"--model {settings.model}: {e}") from None
        # the local cluster gets at most the CPUs this process may use: too few is an error
        # before Ray starts (Ray's own count, checked below, may be lower under a CPU quota)
        replica_resources(settings, float(len(os.sched_getaffinity(0))))
        for name, value in {**SERVE_ENV, **direct_ingress_env(port)}.items():
            os.environ.setdefault(name, value)  # inherited by the cluster's processes
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"RAY_ADDRESS={address}" if address else "this machine"
        raise LaunchError(f"cannot start or reach a Ray cluster at {where}: {_deploy_failure(e)}") from None
    try:
        cpus, gpus = replica_resources(settings, ray.cluster_resources().get("CPU", 0.0))
        serve.start(
            http_options={
                "host": settings.host,
                "port": _proxy_port(settings.host, port),
                "keep_alive_timeout_s": int(max(1, settings.keep_alive_timeout)),
            }
        )
        app = build_app(settings, cpus=cpus, gpus=gpus)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            why = _replica_failure(serve, APP_NAME) or _deploy_failure(e)
            raise LaunchError(f"the replicas did not start: {why}", exit_code=1) from None
        shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
        scaling = (
            f"{settings.min_replicas or 1}-{settings.max_replicas} replicas (autoscaling)"
            if settings.max_replicas is not None
            else f"{settings.replicas} replicas"
        )
        print(
            f"gpt-serve: serving {settings.model_name!r} at http://{shown_host}:{port} on Ray Serve, "
            f"{scaling} x {cpus:g} CPU{'s' if cpus != 1 else ''}{' + 1 GPU' if gpus else ''} "
            f"(web page at /, API at /v1)",
            flush=True,
        )
        _wait_for_signal()
        print("gpt-serve: draining the replicas", file=sys.stderr, flush=True)
        return 0
    finally:
        _stop(address, APP_NAME)


def _proxy_port(host: str, port: int) -> int:
    """Serve's proxy takes `port` unless the ingress replica serves it directly."""
    direct = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
    if direct and os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") == str(port):
        return _free_port(host)
    return port


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(sig, frame):
        if stop.is_set():  # a second signal: stop now
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not stop.wait(1.0):
        pass


def _stop(address: str | None, app_name: str) -> None:
    """Delete the app (the ingress takes its metrics board with it), then leave Ray."""
    import ray
    from ray import serve

    try:
        if address:  # a shared cluster: take our app away, leave Serve to the others
            serve.delete(app_name)
        else:
            serve.shutdown()
    except Exception as e:  # the cluster itself is going away; say so and carry on
        log.warning("stopping the Ray Serve app: %s", e)
    finally:
        ray.shutdown()
