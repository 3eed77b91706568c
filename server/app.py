"""The FastAPI app factory. Its lifespan owns the generation engine:

- `create_app(settings, engine=engine)` serves a ready engine (what `gpt-serve` does after
  loading the model, and what tests do);
- `create_app(settings)` loads `settings.model` in the background once the server is up, so
  /health answers at once and /ready turns 200 when the model is in memory
  (`uvicorn --factory server.app:create_app` configured with GPT_SERVE_* variables).

On shutdown the engine drains: no new requests, running ones get `drain_grace` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import routes_chat, routes_completions, routes_system
from .chat_template import load_chat_template
from .config import Settings
from .errors import install_error_handlers
from .guard import RequestGuard
from .metrics import Metrics
from .openapi import install_openapi

log = logging.getLogger("server")


def load_engine(settings: Settings, metrics=None, threads: int | None = None):
    """Load `settings.model` and build an engine for it (not started). Raises OSError/ValueError
    (gpt.CheckpointError is a ValueError) for a missing or bad model. `threads`: CPU threads for
    the engine thread's kernels."""
    import torch

    import gpt
    from gpt import fast_defaults
    from gpt.speculative import SpeculativeConfig

    from .engine import Engine
    from .hardware import batched_slowdown

    if not settings.model:
        raise ValueError("no model: pass --model PATH or set GPT_SERVE_MODEL")
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    model, tokenizer = gpt.load(settings.model, device=torch.device(settings.device), dtype=dtype)
    if settings.quantize != "none":
        gpt.quantize(model, settings.quantize)
    elif (
        model.device.type == "cpu"
        and dtype in (torch.float16, torch.bfloat16)
        and settings.max_batch_size > 1
    ):
        slowdown = batched_slowdown(dtype, settings.max_batch_size, model.config.n_embd)
        if slowdown > 1.1:
            log.warning(
                "--dtype %s: a batch of %d rows multiplies %.1fx slower than float32 on this CPU (no "
                "native %s arithmetic); for batched serving prefer --dtype float32 or --quantize int8",
                settings.dtype,
                settings.max_batch_size,
                slowdown,
                settings.dtype,
            )
    if model.device.type == "cpu":  # builds our single-row kernels now rather than in the first request
        log.info("single-row kernels: %s", gpt.kernels.status())
    fast = fast_defaults.choose(model, compile=settings.compile, kv_cache_dtype=settings.kv_cache_dtype)
    log.info("%s", fast_defaults.describe(fast, model, quantized=settings.quantize != "none"))
    kv_dtype = fast.kv_cache_dtype
    if (
        kv_dtype is not None
        and kv_dtype != next(model.parameters()).dtype
        and model.device.type == "cpu"
        and not (kv_dtype == torch.float16 and gpt.kernels.attention_f16_available())
    ):
        log.warning(
            "--kv-cache-dtype %s: attention converts the cache on every step on this CPU (our kernel "
            "reads a float16 cache only with F16C and float32 activations); expect it slower",
            settings.kv_cache_dtype,
        )
    return Engine(
        model,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_prompt_tokens=settings.max_prompt_tokens,
        metrics=metrics,
        threads=threads,
        prefix_cache=settings.prefix_cache,
        compile_decode=fast.compile,
        cuda_graphs=not settings.eager,
        kv_cache_dtype=kv_dtype,
        speculative=SpeculativeConfig(
            settings.speculative,
            settings.num_speculative_tokens,
            draft_model=_draft_model(settings, model, tokenizer),
        ),
    )


def _draft_model(settings: Settings, model, tokenizer):
    """The --draft-model, loaded like the model (device, dtype, quantization); a
    gpt.draft_model.DraftModelError when it cannot be loaded or draft for the model."""
    if not settings.draft_model:
        return None
    import torch

    from gpt.draft_model import load_draft

    draft = load_draft(
        settings.draft_model,
        model,
        tokenizer,
        device=torch.device(settings.device),
        dtype=getattr(torch, settings.dtype) if settings.dtype else None,
        quantize=settings.quantize,
    )
    log.info("draft model: %s (%.1fM parameters)", settings.draft_model, draft.num_params() / 1e6)
    return draft


async def _load_in_background(app: FastAPI) -> None:
    state = app.state
    try:
        engine = await asyncio.to_thread(load_engine, state.settings, state.metrics)
    except Exception as e:  # keep serving /health and a 503 /ready that says why
        state.load_error = f"{type(e).__name__}: {e}"
        log.error("cannot load the model: %s", state.load_error)
        return
    engine.start()
    state.engine = engine
    log.info("model %s loaded; ready", state.settings.model_name)


async def drain(app: FastAPI) -> None:
    """Stop taking requests (/ready says 503), let running ones finish within the grace period,
    cancel the rest. Safe to call more than once."""
    state = app.state
    state.draining = True
    if state.engine is not None:
        await state.engine.shutdown(grace=state.settings.drain_grace)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state = app.state
    loader = None
    if state.engine is not None:
        state.engine.start()
    else:
        loader = asyncio.create_task(_load_in_background(app))
    try:
        yield
    finally:
        if loader is not None and not loader.done():
            loader.cancel()
        await drain(app)


class RequestCounter:
    """ASGI middleware counting responses by route and status code (`requests_total`). A plain
    ASGI wrapper rather than BaseHTTPMiddleware, which would buffer and detach streaming bodies."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            route = scope.get("route")  # set by the router once it matched
            endpoint = getattr(route, "path", None) or "other"  # unknown paths share one label
            self.fastapi_app.state.metrics.requests_total.labels(endpoint=endpoint, status=str(status)).inc()

        async def counting_send(message):
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if not counted:  # the 500 is sent by the outer error middleware
                count(500)
            raise


def create_app(settings: Settings | None = None, *, engine=None) -> FastAPI:
    settings = settings if settings is not None else Settings.from_env()
    open_docs = settings.docs and settings.api_key is None
    app = FastAPI(
        title="gpt-serve",
        version="0.1.0",
        lifespan=_lifespan,
        description="An OpenAI-compatible streaming server for gpt checkpoints",
        docs_url="/docs" if open_docs else None,
        redoc_url="/redoc" if open_docs else None,
        openapi_url="/openapi.json" if open_docs else None,
    )
    state = app.state
    state.settings = settings
    state.engine = engine
    state.metrics = engine.metrics if engine is not None else Metrics()
    state.chat_template = load_chat_template(settings.chat_template)
    state.draining = False
    state.load_error = None
    state.created = int(time.time())
    install_error_handlers(app)
    install_openapi(app)
    # the last added runs first: count every response, then CORS (a preflight never needs a
    # body), then the body checks
    app.add_middleware(
        RequestGuard,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout,
        json_paths=routes_system.JSON_BODY_PATHS,
    )
    if settings.origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(RequestCounter, fastapi_app=app)
    if settings.docs and settings.api_key is not None:
        app.include_router(routes_system.keyed_docs_router(app))
    for module in (routes_completions, routes_chat, routes_system):
        app.include_router(module.router)
    app.include_router(routes_system.open_router)
    if routes_system.STATIC_DIR.is_dir():
        app.mount("/static", routes_system.PageFiles(directory=routes_system.STATIC_DIR), name="static")
    return app
