"""The gateway's ASGI app: both APIs' routes, auth, error shapes, metrics, one client.

One ``AsyncCorralClient`` per process (made in the lifespan): every open stream is a queue on
its shared pub/sub connection, never a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Scope

from broker.settings import CorralSettings
from controller.aclient import AsyncCorralClient
from controller.bearer_auth import CHALLENGE, RequireBearer
from controller.config_watch import ConfigWatch
from controller.gateway import ollama_api, openai_api, openai_completions
from controller.gateway.errors import HttpError
from controller.gateway.image_urls import ImageFetcher
from controller.gateway.jobs import ClientGone
from controller.gateway.service import DEFAULT_MAX_BODY_BYTES, Gateway
from controller.tracing import make_tracing, traced

log = logging.getLogger("corral.gateway")
_OPEN_PATHS = frozenset({"/"})
"""Answer without a key: Ollama clients probe ``/`` to see whether the server is up."""


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/api"


def error_response(path: str, exc: HttpError) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = CHALLENGE
    body: dict[str, Any] = (
        ollama_api.error_body(exc) if is_ollama_path(path) else openai_api.error_body(exc)
    )
    return JSONResponse(body, exc.status, headers)


def refuse_without_key(scope: Scope) -> ASGIApp:
    """The 401 in the API's own shape (OpenAI or Ollama error body)."""
    error = HttpError(
        401,
        "a valid API key is required (Authorization: Bearer KEY; see CORRAL_API_KEYS)",
        "authentication_error",
        "invalid_api_key",
    )
    return error_response(scope["path"], error)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(request.url.path, exc)


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    return error_response(request.url.path, HttpError(exc.status_code, message))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; uvicorn needs an answer all the same


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s: %s", request.url.path, type(exc).__name__)
    error = HttpError(500, "internal error in the corral gateway", "server_error")
    return error_response(request.url.path, error)


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return Response(gateway.metrics.exposition(), media_type="text/plain; version=0.0.4")


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def health(request: Request) -> Response:
    """Whether the gateway runs on the config file's current contents: ``config.problem``
    is why the last edit of corral.yaml was refused (the last good config still serves)."""
    watch: ConfigWatch | None = request.app.state.gateway.client.config
    problem = watch.problem if watch is not None else None
    config = {
        "path": str(watch.path) if watch is not None and watch.path else None,
        "reloaded_at": watch.reloaded_at if watch is not None else None,
        "problem": problem,
    }
    return JSONResponse({"status": "degraded" if problem else "ok", "config": config})


def build_app(
    settings: CorralSettings,
    *,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    images: ImageFetcher | None = None,
    config: ConfigWatch | None = None,
) -> ASGIApp:
    """``images``: how image URLs are treated (default: fetched only if the settings say).
    ``config``: reload corral.yaml while serving (each request reads ``current()``)."""

    tracing = make_tracing(settings, "corral-gateway")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fetcher = images or ImageFetcher(enabled=settings.gateway_fetch_image_urls)
        client = AsyncCorralClient(settings, config=config, tracing=tracing)
        gateway = Gateway(client, max_body_bytes, images=fetcher)
        app.state.gateway = gateway
        watching = asyncio.create_task(config.run()) if config is not None else None
        try:
            yield
        finally:
            if watching is not None:
                watching.cancel()
            await gateway.aclose()
            tracing.shutdown()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        *openai_api.routes(),
        *openai_completions.routes(),
        *ollama_api.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HttpError: _http_error,
            HTTPException: _starlette_error,
            ClientGone: _client_gone,
            Exception: _unexpected,
        },
    )
    return RequireBearer(
        traced(app, tracing, "corral.gateway"),
        api_keys,
        refuse_without_key,
        open_paths=_OPEN_PATHS,
    )
