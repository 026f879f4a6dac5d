"""The gateway's ASGI app: both APIs' routes, auth, error shapes, metrics, one client.

One ``AsyncCorralClient`` per process (made in the lifespan): every open stream is a queue on
its shared pub/sub connection, never a thread.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.settings import CorralSettings
from controller.aclient import AsyncCorralClient
from controller.gateway import ollama_api, openai_api, openai_completions
from controller.gateway.errors import HttpError
from controller.gateway.image_urls import ImageFetcher
from controller.gateway.jobs import ClientGone
from controller.gateway.service import DEFAULT_MAX_BODY_BYTES, Gateway

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
        headers["WWW-Authenticate"] = 'Bearer realm="corral"'
    body: dict[str, Any] = (
        ollama_api.error_body(exc) if is_ollama_path(path) else openai_api.error_body(exc)
    )
    return JSONResponse(body, exc.status, headers)


class RequireKey:
    """Bearer-token auth (``Authorization: Bearer KEY``) over the whole app but ``/``."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        # Compare with every key, always: the time taken says nothing about which one is close.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if matched:
            await self.app(scope, receive, send)
            return
        error = HttpError(
            401,
            "a valid API key is required (Authorization: Bearer KEY; see CORRAL_API_KEYS)",
            "authentication_error",
            "invalid_api_key",
        )
        await error_response(scope["path"], error)(scope, receive, send)


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


def build_app(
    settings: CorralSettings,
    *,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    images: ImageFetcher | None = None,
) -> ASGIApp:
    """``images``: how image URLs are treated (default: fetched only if the settings say)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fetcher = images or ImageFetcher(enabled=settings.gateway_fetch_image_urls)
        gateway = Gateway(settings, AsyncCorralClient(settings), max_body_bytes, images=fetcher)
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.aclose()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
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
    return RequireKey(app, api_keys)
