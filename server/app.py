"""The FastAPI application: routes, auth, CORS, errors, and the model loading behind /health."""

from __future__ import annotations

import hmac
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.engine_thread import release_thread_state
from server.errors import TooLarge, Unauthorized, error_response, install_error_handlers
from server.routes import (
    adapters,
    completions,
    embeddings,
    files,
    fine_tuning,
    health,
    messages,
    models,
    responses,
    tokenize,
)
from server.settings import ServerSettings
from server.state import ServerState, ServerStopped

log = logging.getLogger(__name__)


def require_api_key(request: Request) -> None:
    """Bearer auth (or Anthropic's ``x-api-key`` header) on every route it guards; keys
    compared in constant time."""
    keys = request.app.state.cw.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    presented = presented or request.headers.get("x-api-key", "").strip().encode()
    ok = False
    for key in keys:  # no early exit: every key is compared
        ok |= hmac.compare_digest(presented, key.encode())
    if not ok:
        raise Unauthorized(
            "missing or invalid API key (send Authorization: Bearer KEY or x-api-key: KEY)"
        )


def create_app(settings: ServerSettings, state: ServerState | None = None) -> FastAPI:
    """An app for ``settings``. With a started ``state`` (tests) it serves at once; otherwise
    the model loads in a thread at startup while /health answers 503."""
    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not state.loaded:
            app.state.loader = threading.Thread(target=_load, args=(state,), name="candlewick-load")
            app.state.loader.start()
        try:
            yield
        finally:
            # Not waiting for a load in progress: stop() keeps it from starting the engine,
            # and whoever runs the server decides whether to wait for it (see server.serve).
            state.stop()

    app = FastAPI(title="candlewick", lifespan=lifespan)
    app.state.cw = state
    app.state.loader = None  # the thread loading the model, while there is one
    install_error_handlers(app)
    uploads = {"/v1/adapters": settings.max_adapter_bytes, "/v1/files": settings.max_file_bytes}
    limit_body(app, settings.max_request_bytes, uploads)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    guarded = [Depends(require_api_key)]
    app.include_router(completions.router, dependencies=guarded)
    app.include_router(messages.router, dependencies=guarded)
    app.include_router(models.router, dependencies=guarded)
    app.include_router(tokenize.router, dependencies=guarded)
    app.include_router(adapters.router, dependencies=guarded)
    app.include_router(responses.router, dependencies=guarded)
    app.include_router(embeddings.router, dependencies=guarded)
    app.include_router(files.router, dependencies=guarded)
    app.include_router(fine_tuning.router, dependencies=guarded)
    app.include_router(health.router)
    return app


def _load(state: ServerState) -> None:
    """Load the model and start the engine, on a thread of its own (loading takes long and
    touches MLX), which releases its MLX state before it ends (see engine.engine_thread). A
    failure goes to ``on_load_failed`` when set (the command line reports it and exits), else to
    the log; either way ``/health`` shows it."""
    try:
        state.start()
    except ServerStopped:
        pass  # shut down while loading: nothing to report
    except Exception as e:
        kind = getattr(e, "kind", type(e).__name__)  # an engine process's error: its own kind
        state.load_error = f"{kind}: {e}"
        log.debug("loading the model failed", exc_info=True)
        if state.on_load_failed is None:
            log.error("loading the model failed: %s", state.load_error)
    finally:
        release_thread_state()
    if state.load_error and state.on_load_failed is not None:
        state.on_load_failed()


def limit_body(app: FastAPI, max_bytes: int, uploads: dict[str, int]) -> None:
    """413 for a request whose declared body is larger than its limit (uploads of adapters and
    files have their own, larger ones, by path; multipart framing gets a little room)."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes, uploads=uploads)


class BodyLimit:
    """The body-size check as a plain ASGI middleware: it looks at the request's headers and
    otherwise stays out of the way. (Starlette's ``@app.middleware("http")`` would relay every
    chunk of every streamed response through a memory stream and extra tasks, a cost paid per
    token on each SSE stream.)"""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int]) -> None:
        self.app, self.max_bytes, self.uploads = app, max_bytes, uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            upload = self.uploads.get(scope["path"]) if scope["method"] == "POST" else None
            limit = upload + (1 << 16) if upload is not None else self.max_bytes
            if length.isdigit() and int(length) > limit:
                message = f"the request body has {length.decode()} bytes; the limit is {limit}"
                await error_response(TooLarge(message), scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
