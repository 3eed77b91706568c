"""FastAPI dependencies of the API routes: the running engine, the settings, the chat template,
and the check that a request names the model this server serves.

    @router.post("/v1/completions")
    async def create_completion(body: ..., request: Request, engine=Depends(get_engine)): ...

Authentication is a router dependency of its own (`server/auth.py`).
"""

from __future__ import annotations

from fastapi import Request

from .chat_template import ChatTemplate
from .config import Settings
from .errors import APIError, engine_closed
from .requests import EngineClosed


def closed(state) -> EngineClosed | None:
    """Why the server takes no new requests (the engine died, or the app or the engine is
    shutting down), or None."""
    refusal = state.engine.closed() if state.engine is not None else None
    if refusal is None and state.draining:
        refusal = EngineClosed.shutting_down()
    return refusal


# The dependencies are `async def` though they never wait: FastAPI runs a plain `def` dependency
# on its thread pool, a hop to another thread and back for each, on every request.


async def get_engine(request: Request):
    """The running engine, or a 503 while the model loads, the server drains or the engine is dead."""
    state = request.app.state
    refusal = closed(state)
    if refusal is not None:
        raise engine_closed(refusal)
    engine = state.engine
    if engine is None:
        reason = (
            f"the model failed to load: {state.load_error}"
            if state.load_error
            else "the model is still loading"
        )
        raise APIError(503, reason, code="model_not_ready")
    return engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_chat_template(request: Request) -> ChatTemplate:
    return request.app.state.chat_template


def check_model(settings: Settings, name: str | None) -> str:
    """The served model's name; a 404 if the request names another model (None: any)."""
    served = settings.model_name
    if name is not None and name != served:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
    return served
