"""A fake of Google's Gemini API: ``GET /v1beta/models`` and
``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``.

Written from the Gemini API reference. The key comes in the ``x-goog-api-key`` header (or a
``key`` query parameter, which the fake records so a test can check it is never used). The body
has ``contents`` (roles ``user`` and ``model``, ``parts`` with ``text``), an optional
``systemInstruction`` and ``generationConfig`` (temperature, maxOutputTokens, stopSequences,
seed). With ``alt=sse`` each ``data:`` event is a whole ``GenerateContentResponse``; the last
candidate carries ``finishReason`` and every event ``usageMetadata``; the body simply ends.
A prompt the filter blocks is a 200 with ``promptFeedback.blockReason`` and no candidates; an
answer it stops ends with ``finishReason: SAFETY``. Errors are Google's
``{"error": {"code", "message", "status", "details"}}``: an invalid key is a 400 with an
``ErrorInfo`` reason ``API_KEY_INVALID``; a quota is a 429 ``RESOURCE_EXHAUSTED`` with a
``QuotaFailure`` (its ``quotaId`` says per minute or per day) and a ``RetryInfo``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import DropConnection, serve_in_thread

DEFAULT_REPLY = "Tokens stream back as the backend produces them."
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
QUOTA_METRIC_PREFIX = "generativelanguage.googleapis.com"


def quota_details(per: str, retry_s: int) -> list[dict[str, Any]]:
    """A 429's details as Gemini sends them; ``per`` is "Minute" or "Day"."""
    return [
        {
            "@type": QUOTA_FAILURE,
            "violations": [
                {
                    "quotaMetric": f"{QUOTA_METRIC_PREFIX}/generate_content_free_tier_requests",
                    "quotaId": f"GenerateRequestsPer{per}PerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": "gemini-test-flash"},
                    "quotaValue": "15",
                }
            ],
        },
        {"@type": RETRY_INFO, "retryDelay": f"{retry_s}s"},
    ]


@dataclass
class FakeGeminiState:
    models: list[str] = field(default_factory=lambda: ["gemini-test-flash", "gemini-test-pro"])
    api_key: str = "AIza-fake-0000"
    reply: str = DEFAULT_REPLY
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail_status: int | None = None
    fail_message: str = "An internal error has occurred."
    fail_details: list[dict[str, Any]] = field(default_factory=list)
    fail_headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    error_after: int | None = None
    error_message: str = "An internal error has occurred."
    bad_json_after: int | None = None
    block_prompt: str | None = None
    """Answer every prompt with ``promptFeedback.blockReason`` set to this (e.g. "SAFETY")."""
    safety_after: int | None = None
    """Stop the answer after this many pieces with ``finishReason: SAFETY``."""
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    keys_in_query: list[str] = field(default_factory=list)
    model_listings: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    aborted_streams: int = 0
    dropped_streams: int = 0


def _error(
    status: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "code": status,
        "message": message,
        "status": STATUS_NAMES.get(status, "UNKNOWN"),
        "details": details or [],
    }
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\r\n\r\n".encode()  # Google ends SSE lines with CRLF


def build_app(state: FakeGeminiState) -> Starlette:
    def refused(request: Request) -> Response | None:
        if "key" in request.query_params:
            state.keys_in_query.append(request.query_params["key"])
        if state.fail_status is not None:
            return _error(
                state.fail_status, state.fail_message, state.fail_details, state.fail_headers
            )
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            return _error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity.",
            )
        if key != state.api_key:
            return _error(
                400,
                f"API key not valid. Please pass a valid API key. ({key})",
                [{"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com"}],
            )
        return None

    async def list_models(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        state.model_listings += 1
        models = [
            {
                "name": f"models/{m}",
                "displayName": m,
                "inputTokenLimit": 1_048_576,
                "outputTokenLimit": 8192,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for m in state.models
        ]
        models.append(
            {
                "name": "models/text-embedding-test",
                "inputTokenLimit": 2048,
                "supportedGenerationMethods": ["embedContent"],
            }
        )
        return JSONResponse({"models": models})

    async def stream(events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        state.streams_started += 1
        finished = dropped = False
        try:
            for index, event in enumerate(events):
                if state.drop_after is not None and index >= state.drop_after:
                    dropped = True
                    state.dropped_streams += 1
                    raise DropConnection
                if state.error_after is not None and index >= state.error_after:
                    error = {"code": 500, "message": state.error_message, "status": "INTERNAL"}
                    yield _sse({"error": error})
                    break
                if state.bad_json_after is not None and index >= state.bad_json_after:
                    yield _sse('{"candidates": [{"content": ')
                    break
                await asyncio.sleep(state.first_token_delay if index == 0 else state.token_delay)
                yield _sse(event)
            finished = True
            state.streams_completed += 1
        finally:
            if not finished and not dropped:
                state.aborted_streams += 1

    async def model_method(request: Request) -> Response:
        target = request.path_params["target"]
        model, _, method = target.partition(":")
        if method not in ("streamGenerateContent", "generateContent"):
            return JSONResponse({"error": {"code": 404, "message": "Not Found"}}, status_code=404)
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "Invalid JSON payload received.")
        state.chat_bodies.append(body)
        if model not in state.models:
            return _error(
                404,
                f"models/{model} is not found for API version v1beta, or is not supported "
                "for generateContent. Call ListModels to see the list of available models.",
            )
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return _error(400, "* GenerateContentRequest.contents: contents is not specified")
        for content in contents:
            if content.get("role") not in ("user", "model"):
                return _error(400, f"Please use a valid role: user, model. ({content.get('role')})")
        words = sum(len(str(part.get("text", "")).split()) for c in contents for part in c["parts"])
        system = body.get("systemInstruction") or {}
        words += sum(len(str(p.get("text", "")).split()) for p in system.get("parts", []))
        usage: dict[str, Any] = {"promptTokenCount": words, "totalTokenCount": words}
        if state.block_prompt is not None:
            blocked = {
                "promptFeedback": {"blockReason": state.block_prompt},
                "usageMetadata": usage,
            }
            return StreamingResponse(stream([blocked]), media_type="text/event-stream")
        config = body.get("generationConfig") or {}
        thinking = config.get("thinkingConfig")
        if thinking is not None:
            # As documented for 2.5 models: a budget of 0 turns thinking off, which Pro
            # cannot do (its range is 128..32768); -1 is dynamic.
            budget = thinking.get("thinkingBudget") if isinstance(thinking, dict) else None
            if not isinstance(budget, int) or budget < -1 or budget > 32768:
                return _error(400, "thinking_budget: invalid value")
            if "pro" in model and 0 <= budget < 128:
                return _error(400, "Budget 0 is invalid. This model only works in thinking mode.")
        text, finish = state.reply, "STOP"
        for stop in config.get("stopSequences") or []:
            if stop in text:
                text = text[: text.index(stop)]
        pieces = re.findall(r"\s*\S+", text) or [""]
        limit = config.get("maxOutputTokens")
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[:limit], "MAX_TOKENS"
        if state.safety_after is not None and state.safety_after < len(pieces):
            pieces, finish = pieces[: state.safety_after], "SAFETY"
        events = []
        for index, piece in enumerate(pieces):
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": piece}], "role": "model"},
                "index": 0,
            }
            last = index == len(pieces) - 1
            if last:
                candidate["finishReason"] = finish
            counts = dict(usage)
            if last:
                counts["candidatesTokenCount"] = len(pieces)
                counts["totalTokenCount"] = words + len(pieces)
            events.append(
                {"candidates": [candidate], "usageMetadata": counts, "modelVersion": model}
            )
        if request.query_params.get("alt") != "sse":
            return JSONResponse(events)  # without alt=sse: one JSON array
        return StreamingResponse(stream(events), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1beta/models", list_models, methods=["GET"]),
            Route("/v1beta/models/{target:path}", model_method, methods=["POST"]),
        ]
    )


@dataclass
class FakeGemini:
    url: str
    state: FakeGeminiState

    def wait_until(
        self, predicate: Callable[[FakeGeminiState], bool], timeout: float = 5.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state):
                return True
            time.sleep(0.01)
        return predicate(self.state)


@contextmanager
def running_fake_gemini(**settings: Any) -> Iterator[FakeGemini]:
    """Start the fake on a free loopback port; ``settings`` are ``FakeGeminiState`` fields."""
    state = FakeGeminiState(**settings)
    with serve_in_thread(build_app(state)) as url:
        yield FakeGemini(url=url, state=state)
