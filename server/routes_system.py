"""Everything that is not generation: probes, metrics, the model list, the tokenizer endpoints
and the web page. Probes, metrics and the page are open; the rest needs the API key."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .api_responses import ModelCard, ModelList
from .auth import require_api_key
from .chat_template import ChatTemplate
from .config import Settings
from .deps import check_model, closed, get_chat_template, get_engine, get_settings
from .errors import APIError, engine_closed, invalid
from .params import render_messages
from .protocol import DetokenizeRequest, TokenizePrompt, TokenizeRequest

STATIC_DIR = Path(__file__).parent / "static"
# the routes that take a JSON body (server/guard.py refuses other content types there)
JSON_BODY_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})

open_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_api_key)])


def keyed_docs_router(app) -> APIRouter:
    """/openapi.json, /docs and /redoc behind the API key (what a server with a key serves).
    A browser cannot add the key to the docs page's own fetch of the schema, so these are for
    tools: `curl -H "Authorization: Bearer $KEY" .../openapi.json`."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    docs = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi():
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    async def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @docs.get("/redoc")
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return docs


@open_router.get("/health")
async def health():
    """The process is up (it may still be loading the model)."""
    return {"status": "ok"}


@open_router.get("/ready")
async def ready(request: Request):
    """200 once the model is loaded; 503 before that and while draining (take me out of rotation)."""
    state = request.app.state
    refusal = closed(state)
    if refusal is not None:
        return engine_closed(refusal).response()
    if state.engine is None:
        why = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        return APIError(503, why, code="model_not_ready").response()
    return {"status": "ready", "model": state.settings.model_name}


@open_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(request: Request):
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


# Revalidated on every load (a cheap 304 while unchanged): a browser never runs a cached
# static/app.js against a newer page after an upgrade.
REVALIDATE = {"Cache-Control": "no-cache"}


class PageFiles(StaticFiles):
    """/static: the web page's script, with REVALIDATE."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(REVALIDATE)
        return response


@open_router.get("/", include_in_schema=False)
async def index():
    """The web page: completion and chat modes (server/static/index.html and app.js)."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise APIError(404, "the web page is not installed (server/static/index.html)")
    return FileResponse(page, media_type="text/html", headers=REVALIDATE)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request):
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, settings: Settings = Depends(get_settings)):
    check_model(settings, model_id)
    return _card(request)


def _card(request: Request) -> ModelCard:
    """The served model; listed while it loads too (max_model_len 0 until it is in memory). A
    model is a chat model only when the operator gave it a chat template."""
    state = request.app.state
    max_len = state.engine.limits.max_len if state.engine is not None else 0
    mode = "chat" if state.settings.chat_template else "completion"
    return ModelCard(
        id=state.settings.model_name, created=state.created, max_model_len=max_len, suggested_mode=mode
    )


@router.post("/tokenize")
async def tokenize(
    body: TokenizeRequest,
    engine=Depends(get_engine),
    settings: Settings = Depends(get_settings),
    template: ChatTemplate = Depends(get_chat_template),
):
    """vLLM's shape: {"prompt": text} (or {"messages": [...]}, rendered by the chat template)
    -> {"tokens": [...], "count": n, "max_model_len": context}."""
    check_model(settings, body.model)
    text = body.prompt if isinstance(body, TokenizePrompt) else render_messages(template, body.messages)
    tokens = await asyncio.to_thread(engine.tokenizer.encode, text)  # a large text must not hold the loop
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.limits.max_len}


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, engine=Depends(get_engine), settings: Settings = Depends(get_settings)
):
    """{"tokens": [...]} -> {"prompt": text}; an id outside the vocabulary is a 400."""
    check_model(settings, body.model)
    tok = engine.tokenizer
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {body.tokens[bad]} is out of range [0, {tok.vocab_size})", f"tokens.{bad}")
    try:
        return JSONResponse({"prompt": tok.decode(body.tokens)})
    except ValueError as e:  # an id inside the range that the encoding leaves unassigned
        raise invalid(str(e), "tokens") from None
