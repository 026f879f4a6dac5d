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

Function calling, as documented: ``tools`` hold ``functionDeclarations`` whose ``parameters``
use only the fields of the API's ``Schema`` (an unknown key such as ``additionalProperties`` is
a 400, so is an object without properties); a user turn of ``functionResponse`` parts answers
the model turn of ``functionCall`` parts before it, one response per call; a ``gemini-3*``
model refuses a replayed call without its ``thoughtSignature``. With ``call_args`` set, a chat
offering tools is answered with one ``functionCall`` of its first function.
"""

from __future__ import annotations

import asyncio
import base64
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
    call_args: dict[str, Any] | None = None
    """When set, a chat offering tools whose last turn is not function responses is answered
    with one ``functionCall`` of the first declared function with these ``args``."""
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


SCHEMA_FIELDS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    }
)
"""The fields of the API's ``Schema``: any other key is an unknown name (400)."""
SIGNATURE_MISSING = "Function call is missing a thought_signature in functionCall parts."


def schema_problem(schema: object, where: str) -> str | None:
    if not isinstance(schema, dict):
        return f"Invalid value at '{where}': expected a Schema object"
    for key, value in schema.items():
        if key not in SCHEMA_FIELDS:
            return (
                f'Invalid JSON payload received. Unknown name "{key}" at '
                f"'{where}': Cannot find field."
            )
        if key == "type" and not isinstance(value, str):
            return f"Invalid value at '{where}.type': expected one type"
        if key == "properties":
            for name, sub in (value or {}).items():
                if (
                    problem := schema_problem(sub, f"{where}.properties[{name}].value")
                ) is not None:
                    return problem
        if key == "items" and (problem := schema_problem(value, f"{where}.items")) is not None:
            return problem
    if str(schema.get("type", "")).lower() == "object" and not schema.get("properties"):
        return f"* {where}.properties: should be non-empty for OBJECT type"
    return None


def tools_problem(tools: object) -> str | None:
    if not isinstance(tools, list):
        return "Invalid value at 'tools': expected a list"
    for index, tool in enumerate(tools):
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        if not isinstance(declarations, list):
            return f"Invalid value at 'tools[{index}]': expected functionDeclarations"
        for number, declaration in enumerate(declarations):
            where = f"tools[{index}].function_declarations[{number}]"
            if not declaration.get("name"):
                return f"* GenerateContentRequest.{where}.name: Name cannot be empty."
            if "parameters" in declaration:
                problem = schema_problem(declaration["parameters"], f"{where}.parameters")
                if problem is not None:
                    return problem
    return None


def contents_problem(contents: list[dict[str, Any]], model: str) -> str | None:
    """Function turns as the API checks them: each user turn of function responses answers
    the model turn of calls just before it, one response per call; inline data is base64;
    a Gemini 3 model's replayed calls carry their thought signature."""
    for index, content in enumerate(contents):
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{index}].parts: must not be empty."
        for part in parts:
            data = part.get("inline_data") or part.get("inlineData")
            if data is not None:
                try:
                    base64.b64decode(data.get("data", ""), validate=True)
                except ValueError:
                    return f"Invalid value at 'contents[{index}].parts': invalid base64 data"
                if not str(data.get("mime_type") or data.get("mimeType") or ""):
                    return f"contents[{index}].parts: inline_data needs a mime_type"
        calls = [p for p in parts if "functionCall" in p]
        if calls and model.startswith("gemini-3") and "thoughtSignature" not in calls[0]:
            return SIGNATURE_MISSING
        responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
        if responses:
            before = contents[index - 1]["parts"] if index else []
            asked = [p["functionCall"]["name"] for p in before if "functionCall" in p]
            answered = [r.get("name") for r in responses]
            if len(asked) != len(answered) or sorted(asked) != sorted(answered):
                return (
                    "Please ensure that the number of function response parts is equal to "
                    "the number of function call parts of the function call turn."
                )
            if any(not isinstance(r.get("response"), dict) for r in responses):
                return f"Invalid value at 'contents[{index}].parts': response must be an object"
    return None


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
        problem = contents_problem(contents, model)
        if problem is None and "tools" in body:
            problem = tools_problem(body["tools"])
        if problem is not None:
            return _error(400, problem)
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
        answering = any("functionResponse" in p for p in contents[-1]["parts"])
        if state.call_args is not None and body.get("tools") and not answering:
            name = body["tools"][0]["functionDeclarations"][0]["name"]
            part: dict[str, Any] = {"functionCall": {"name": name, "args": state.call_args}}
            if model.startswith("gemini-3"):
                part["thoughtSignature"] = base64.b64encode(b"fake signature").decode()
            # A call comes whole, in one event, and the answer still ends with STOP.
            counts = {**usage, "candidatesTokenCount": 1, "totalTokenCount": words + 1}
            candidate = {
                "content": {"parts": [part], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
            event = {"candidates": [candidate], "usageMetadata": counts, "modelVersion": model}
            if request.query_params.get("alt") != "sse":
                return JSONResponse([event])
            return StreamingResponse(stream([event]), media_type="text/event-stream")
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
