"""`gpt-serve` on Ray Serve: replicas of today's app behind one ingress.

- `ModelReplica` loads the model and runs the same FastAPI app and engine as `gpt-serve` does
  alone, on its share of CPUs (torch's threads set to match) or one GPU. Requests reach it as
  `ForwardedRequest`s and are played against that app, so routes, auth, limits, errors and
  streaming are the single server's own.
- `Ingress` takes HTTP from Ray Serve's proxy, reads the body (within the size and time limits),
  and forwards it through a handle whose router is `PrefixAffinityRouter`. A replica that dies
  before the first byte of its reply is retried on another; a stream cut mid-way ends with an
  error event and `[DONE]`. It serves /health, /ready and the merged /metrics itself.

`build_app(settings, ...)` is the application; `app_builder(args)` the same for `serve run` and
Serve config files (deploy/ray/).

No `from __future__ import annotations` here: Serve's class-based routes need real annotations
for FastAPI to see that `request` is the Request.
"""

import asyncio
import dataclasses
import os
import socket

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from ..config import Settings
from ..errors import APIError
from ..sse import sse
from . import ingress_metrics, metrics_board
from .forwarding import ForwardedRequest, ResponseStart, play, routing_text_of
from .router import PrefixAffinityRouter, RoundRobinRouter

APP_NAME = "gpt-serve"
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]  # all forwarded as they come
RETRIES = 3  # replicas tried for a request before it gets a 503
_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


class ModelReplica:
    async def __init__(self, settings: dict, threads: int):
        import torch

        from ..app import create_app, load_engine

        # the engine thread does the arithmetic on `threads` cores; this one only loads the model
        torch.set_num_threads(1)
        self.settings = Settings(**settings)
        self.engine = await asyncio.to_thread(load_engine, self.settings, None, threads)
        self.app = create_app(self.settings, engine=self.engine)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.info = {"pid": os.getpid(), "node": socket.gethostname(), "threads": threads}
        self.board = metrics_board.get_board(context.app_name)
        self._poster = asyncio.create_task(self._post_metrics())

    async def _post_metrics(self) -> None:
        while True:
            body, _ = self.app.state.metrics.render()
            ready = self.engine.dead is None and not self.app.state.draining
            self.board.post.remote(self.replica, body.decode(), {**self.info, "ready": ready})
            await asyncio.sleep(metrics_board.POST_EVERY_S)

    async def __call__(self, request: ForwardedRequest):
        async for item in play(self.app, request, self.replica):
            yield item

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: one whose engine thread died."""
        if self.engine.dead is not None:
            raise RuntimeError(f"the engine stopped: {self.engine.dead}")

    async def __del__(self):
        """Scale-down and shutdown: Serve has already waited for the streams in flight (up to
        drain_grace); then the engine drains as `gpt-serve` does on SIGTERM."""
        self._poster.cancel()
        self.board.drop.remote(self.replica)
        await self._lifespan.__aexit__(None, None, None)


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, model, settings: dict):
        self.model = model.options(stream=True)
        self.settings = Settings(**settings)
        self.app_name = serve.get_replica_context().app_name
        self.board = metrics_board.get_board(self.app_name)

    def __del__(self):
        """The app is going away (serve delete, serve shutdown): its board goes with it."""
        metrics_board.kill_board(self.app_name)

    async def _replicas(self) -> dict[str, dict]:
        return await self.board.fresh.remote()

    @ingress_app.get("/health")
    async def health(self) -> dict:
        posts = await self._replicas()
        replicas = [{"replica": r, **{k: v for k, v in p.items() if k != "text"}} for r, p in posts.items()]
        return {"status": "ok", "replicas": sorted(replicas, key=lambda r: r["replica"])}

    @ingress_app.get("/ready")
    async def ready(self):
        posts = await self._replicas()
        ready = sum(p["ready"] for p in posts.values())
        if not ready:
            return APIError(503, "no replica is ready", code="model_not_ready").response()
        return {"status": "ready", "model": self.settings.model_name, "replicas": ready}

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        posts = {r: p["text"] for r, p in (await self._replicas()).items()}
        body = metrics_board.merge(posts, ingress_metrics.REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @ingress_app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        try:
            body = await asyncio.wait_for(self._read_body(request), self.settings.body_timeout)
        except asyncio.TimeoutError:
            late = APIError(408, "the request body took too long to arrive", code="request_timeout")
            return late.response()
        except APIError as e:
            return e.response()
        path = request.url.path
        forwarded = ForwardedRequest(
            method=request.method,
            path=path,
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope["headers"]),
            body=body,
            client=request.scope.get("client"),
            routing_text=routing_text_of(path, body),
        )
        try:
            start, reply = await self._open(forwarded)
        except APIError as e:
            return e.response()
        response = StreamingResponse(self._rest(reply, start), status_code=start.status)
        response.raw_headers = [*start.headers, (b"x-gptserve-replica", start.replica.encode())]
        return response

    async def _read_body(self, request: Request) -> bytes:
        limit, chunks, size = self.settings.max_body_bytes, [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _open(self, forwarded: ForwardedRequest):
        """The reply's start, from the first replica that gives one."""
        why = "no replica answered"
        for _ in range(RETRIES):
            reply = self.model.remote(forwarded)
            try:
                start = await reply.__anext__()
            except _REPLICA_GONE as e:
                ingress_metrics.REPLICA_FAILURES.labels(when="before_first_byte").inc()
                why = f"its replica stopped ({type(e).__name__})"
                reply.cancel()
                continue
            except StopAsyncIteration:
                why = "its replica sent no reply"
                continue
            assert isinstance(start, ResponseStart)
            return start, reply
        raise APIError(503, f"the request could not be served: {why}", code="replica_unavailable")

    async def _rest(self, reply, start: ResponseStart):
        streaming = any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers
        )
        try:
            async for chunk in reply:
                yield chunk
        except _REPLICA_GONE:
            ingress_metrics.REPLICA_FAILURES.labels(when="mid_stream").inc()
            if not streaming:
                raise
            error = APIError(502, "the replica serving this stream stopped", code="replica_failed")
            yield sse(error.body()).encode()
            yield sse("[DONE]").encode()
        finally:
            reply.cancel()


def replica_threads(cpus: float) -> int:
    return max(1, int(cpus))


def build_app(settings: Settings, *, cpus: float = 1.0, gpus: float = 0.0, imbalance: int = 8):
    """The Serve application: `settings.replicas` model replicas, or with `max_replicas`
    autoscaling from `min_replicas` on requests in flight; each with `cpus` CPUs or `gpus` GPUs."""
    replicas, least = settings.replicas, settings.min_replicas or 1
    scaling: dict = {"num_replicas": replicas or 1}
    if settings.max_replicas is not None:
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=least,
                initial_replicas=max(replicas, least) if replicas else None,
                max_replicas=settings.max_replicas,
                # a replica decodes max_batch_size rows at once; past half of that, add one
                target_ongoing_requests=max(1, settings.max_batch_size // 2),
                upscale_delay_s=5,
                downscale_delay_s=30,
            )
        }
    router = RoundRobinRouter if settings.routing == "round-robin" else PrefixAffinityRouter
    model = serve.deployment(ModelReplica).options(
        name="model",
        **scaling,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        graceful_shutdown_timeout_s=settings.drain_grace,
        # a model that does not load fails the same way every time: one try per replica
        max_constructor_retry_count=max(replicas, least),
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2,
        health_check_timeout_s=30,
        request_router_config=RequestRouterConfig(
            # by name, not the class: a class is pickled by value, and its copy would count its
            # decisions in a registry of its own that /metrics never sees
            request_router_class=f"{router.__module__}.{router.__name__}",
            request_router_kwargs={"imbalance": imbalance} if router is PrefixAffinityRouter else {},
        ),
    )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_connections,
    )
    values = dataclasses.asdict(settings)
    return ingress.bind(model.bind(values, replica_threads(cpus)), values)


def app_builder(args: dict):
    """For `serve run server.cluster.deployment:app_builder model=PATH replicas=2` and Serve config
    files: every `gpt-serve` setting by its field name (replicas, min_replicas, max_replicas and
    cpus_per_replica among them), plus gpus_per_replica."""
    args = dict(args)
    gpus = float(args.pop("gpus_per_replica", 0))
    settings = Settings.from_env(**{k: _parsed(k, v) for k, v in args.items()})
    return build_app(settings, cpus=settings.cpus_per_replica or 1.0, gpus=gpus)


def _parsed(name: str, value):
    from ..config import parse_field

    return parse_field(name, value) if isinstance(value, str) else value
