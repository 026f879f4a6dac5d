"""A fake OpenAI-compatible server: ``/v1/models``, streamed ``/v1/chat/completions`` and
``/v1/embeddings``.

It follows OpenAI's chat completions streaming format: Server-Sent Events, each ``data:`` a
``chat.completion.chunk`` whose first delta carries the role, then one content delta per token,
then an empty delta with ``finish_reason``; with ``stream_options.include_usage`` every chunk
has ``"usage": null`` and one more chunk with no choices carries the usage; ``data: [DONE]``
ends it. Errors are ``{"error": {"message", "type", "param", "code"}}``.

Switches: served models, the canned reply, token delays, whether the server honours
``include_usage`` (llama_cpp.server ignores it), a required API key (its 401 message echoes
the key it got, so a test can check the adapter scrubs it), "fail with status N", "drop the
connection after K events" and "send an error event after K events". Abandoned streams are
counted in ``aborted_streams``. Embeddings: ``input`` a string or a list of strings, one
``{"object": "embedding", "index", "embedding"}`` each (floats, or base64 little-endian
float32 with ``encoding_format: base64``), ``usage.prompt_tokens``; a model not served is a
404 ``model_not_found``; ``embeddings_reversed`` lists them last index first (the indexes say
which is which).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import DropConnection, serve_in_thread

DEFAULT_REPLY = "Tokens stream back as the backend produces them."
MISTRAL_UNKNOWN_FIELDS = frozenset(
    {"stream_options", "seed", "max_completion_tokens", "frequency_penalty", "logprobs"}
)
"""Fields of OpenAI's request that Mistral's API refuses (its ``random_seed`` is the seed)."""


@dataclass
class FakeOpenAIState:
    """What the fake serves and what it has seen; tests may read and change it while it runs."""

    models: list[str] = field(default_factory=lambda: ["tiny-model"])
    reply: str = DEFAULT_REPLY
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    supports_usage: bool = True
    api_key: str | None = None
    fail_status: int | None = None
    fail_message: str = "The server had an error while processing your request."
    fail_type: str = "server_error"
    fail_code: str | None = None
    """``insufficient_quota`` with a 429 is OpenAI's "your credit is spent"."""
    fail_headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    bad_json_after: int | None = None
    """Send an event whose data is not JSON in place of the chunk at this index."""
    ratelimit_headers: dict[str, str] = field(default_factory=dict)
    """Sent on every answer, as OpenAI sends ``x-ratelimit-remaining-requests`` and the like."""
    model_listings: int = 0
    dialect: str = "openai"
    """"mistral": refuse fields Mistral does not know (422 ``extra_forbidden``, as Mistral's
    API answers ``stream_options`` and ``seed``), read ``random_seed``, and always send the
    usage with the last chunk."""
    error_after: int | None = None
    error_message: str = "the slot was released while generating"
    bodies: list[dict[str, Any]] = field(default_factory=list)
    props_requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    streams_started: int = 0
    streams_completed: int = 0
    aborted_streams: int = 0
    dropped_streams: int = 0
    total_slots: int | None = None
    """When set, GET /props answers as llama.cpp's server does, with this many slots."""
    open_streams: int = 0
    peak_streams: int = 0
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    """``{"id", "name", "arguments"}`` (arguments a JSON string): a chat offering tools that
    does not end with a tool's result is answered with these calls, streamed as OpenAI does
    (the id and name first, the arguments in pieces) and finished with ``tool_calls``."""
    reasoning: str = ""
    """Streamed first as ``reasoning_content`` deltas (llama.cpp's --reasoning-format)."""
    embeddings_reversed: bool = False
    embedding_bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chat_bodies(self) -> list[dict[str, Any]]:
        return self.bodies


def _error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def tool_call_events(
    chunk: Callable[[dict[str, Any]], dict[str, Any]], calls: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """OpenAI's streamed calls: per call, one delta with index, id, type and name, then its
    arguments (a JSON string) cut into pieces that only parse once joined."""
    events = []
    for index, call in enumerate(calls):
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        events.append(chunk({"tool_calls": [head]}))
        text = call["arguments"]
        step = max(1, len(text) // 3)
        for start in range(0, len(text), step):
            piece = {"index": index, "function": {"arguments": text[start : start + step]}}
            events.append(chunk({"tool_calls": [piece]}))
    return events


def build_app(state: FakeOpenAIState) -> Starlette:
    def refused(request: Request) -> Response | None:
        """The checks every endpoint makes first: the fail switch, then the API key."""
        auth = request.headers.get("authorization")
        state.authorizations.append(auth)
        if state.fail_status is not None:
            return _error(
                state.fail_status,
                state.fail_message,
                state.fail_type,
                state.fail_code,
                {**state.ratelimit_headers, **state.fail_headers},
            )
        if state.api_key is not None and auth != f"Bearer {state.api_key}":
            given = (auth or "").removeprefix("Bearer ")
            return _error(
                401,
                f"Incorrect API key provided: {given}",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None

    async def models(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        state.model_listings += 1
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "me"} for m in state.models]
        return JSONResponse({"object": "list", "data": data}, headers=state.ratelimit_headers)

    async def stream(events: Sequence[dict[str, Any]]) -> AsyncIterator[bytes]:
        state.streams_started += 1
        state.open_streams += 1
        state.peak_streams = max(state.peak_streams, state.open_streams)
        finished = dropped = False
        try:
            for index, event in enumerate(events):
                if state.drop_after is not None and index >= state.drop_after:
                    dropped = True
                    state.dropped_streams += 1
                    raise DropConnection
                if state.error_after is not None and index >= state.error_after:
                    yield _event(
                        {"error": {"message": state.error_message, "type": "server_error"}}
                    )
                    break
                if state.bad_json_after is not None and index >= state.bad_json_after:
                    yield _event('{"id": "chatcmpl-fake", "choices": [')
                    break
                await asyncio.sleep(state.first_token_delay if index == 0 else state.token_delay)
                yield _event(event)
            else:
                yield _event("[DONE]")
            finished = True
            state.streams_completed += 1
        finally:
            # Only a client that went away leaves the loop unfinished without a drop.
            if not finished and not dropped:
                state.aborted_streams += 1
            state.open_streams -= 1

    async def chat_completions(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        state.bodies.append(body)
        if state.dialect == "mistral":
            extra = sorted(set(body) & MISTRAL_UNKNOWN_FIELDS)
            if extra:
                detail = [
                    {
                        "type": "extra_forbidden",
                        "loc": ["body", field],
                        "msg": "Extra inputs are not permitted",
                    }
                    for field in extra
                ]
                return JSONResponse(
                    {
                        "object": "error",
                        "message": {"detail": detail},
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    },
                    status_code=422,
                )
        model = body.get("model")
        if model not in state.models:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty array", "invalid_request_error")
        effort = body.get("reasoning_effort")
        if effort is not None:
            # Only the reasoning models (o-series, GPT-5) take it; only GPT-5 knows "minimal".
            reasoning = model.startswith(("o1", "o3", "o4", "gpt-5"))
            if not reasoning:
                return _error(
                    400,
                    "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                    "invalid_request_error",
                    "unsupported_parameter",
                )
            allowed = (
                ("minimal", "low", "medium", "high")
                if model.startswith("gpt-5")
                else (
                    "low",
                    "medium",
                    "high",
                )
            )
            if effort not in allowed:
                return _error(
                    400,
                    f"Unsupported value: 'reasoning_effort' does not support {effort!r} with "
                    "this model.",
                    "invalid_request_error",
                    "unsupported_value",
                )
        text = state.reply
        for stop in body.get("stop") or []:
            if stop in text:
                text = text[: text.index(stop)]
        pieces = re.findall(r"\s*\S+", text)
        finish = "stop"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        usage_wanted = state.supports_usage and bool(
            (body.get("stream_options") or {}).get("include_usage")
        )
        usage_always = state.dialect == "mistral"
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
        }
        if usage_wanted:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "choices": [choice]}

        events = [chunk({"role": "assistant", "content": ""})]
        events += [
            chunk({"reasoning_content": piece}) for piece in re.findall(r"\s*\S+", state.reasoning)
        ]
        calls_now = bool(body.get("tools")) and messages[-1].get("role") != "tool"
        if calls_now and state.tool_calls:
            pieces, finish = [], "tool_calls"
            events += tool_call_events(chunk, state.tool_calls)
        events += [chunk({"content": piece}) for piece in pieces]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        if usage_always:  # Mistral: the usage rides on the chunk with the finish reason
            events.append({**chunk({}, finish), "usage": usage})
        else:
            events.append(chunk({}, finish))
        if usage_wanted:
            events.append({**base, "choices": [], "usage": usage})
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice]})
        return StreamingResponse(
            stream(events), media_type="text/event-stream", headers=state.ratelimit_headers
        )

    async def props(request: Request) -> Response:
        state.props_requests += 1
        if state.total_slots is None:
            return JSONResponse({"error": "Not Found"}, status_code=404)
        return JSONResponse({"total_slots": state.total_slots, "chat_template": ""})

    async def embeddings(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        body = await request.json()
        state.embedding_bodies.append(body)
        if body.get("model") not in state.models:
            message = f"The model `{body.get('model')}` does not exist"
            return _error(404, message, "invalid_request_error", "model_not_found")
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return _error(400, "'input' is invalid", "invalid_request_error")
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _base64(fake_embedding(text)) if as_base64 else fake_embedding(text),
            }
            for index, text in enumerate(texts)
        ]
        if state.embeddings_reversed:
            data.reverse()
        tokens = sum(len(text.split()) for text in texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/props", props, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
    )


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic vector per text (exact in float32, so base64 round-trips it)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 128 for b in digest[:dims]]


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@dataclass
class FakeOpenAI:
    """A running fake: where it listens and what it has seen."""

    url: str
    state: FakeOpenAIState

    def wait_until(
        self, predicate: Callable[[FakeOpenAIState], bool], timeout: float = 5.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state):
                return True
            time.sleep(0.01)
        return predicate(self.state)


@contextmanager
def running_fake_openai(**settings: Any) -> Iterator[FakeOpenAI]:
    """Start the fake on a free loopback port; ``settings`` are ``FakeOpenAIState`` fields."""
    state = FakeOpenAIState(**settings)
    with serve_in_thread(build_app(state)) as url:
        yield FakeOpenAI(url=url, state=state)
