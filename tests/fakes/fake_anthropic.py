"""A fake of Anthropic's Messages API: ``GET /v1/models`` and streamed ``POST /v1/messages``.

Written from Anthropic's API reference. Requests need ``x-api-key`` and ``anthropic-version``
headers; the body needs ``model``, ``max_tokens`` and ``messages`` (roles ``user`` and
``assistant`` only: a system prompt goes in the top-level ``system``). A streamed answer is
Server-Sent Events, each ``event:`` named as its data's ``type``: ``message_start`` (the
message with empty content and the input tokens), ``content_block_start``, a ``ping``,
``content_block_delta`` (``text_delta``) per token, ``content_block_stop``, ``message_delta``
(``stop_reason`` and the output tokens), ``message_stop``. Errors are
``{"type": "error", "error": {"type", "message"}}``, as HTTP bodies (401
``authentication_error``, 404 ``not_found_error``, 429 ``rate_limit_error``, 529
``overloaded_error``...) and, after the 200 header, as an ``event: error``. Every answer carries
``anthropic-ratelimit-*`` headers.

Tools, as documented: ``tools`` are ``{name, description, input_schema}`` (an object schema);
content may be a list of ``text`` (non-empty), ``image`` (base64, PNG/JPEG/GIF/WebP),
``tool_use`` (assistant) and ``tool_result`` (user) blocks; every ``tool_use`` must be answered
by a ``tool_result`` at the start of the very next message, and a ``tool_result`` must answer a
``tool_use`` of the message before (400 otherwise). With ``tool_input`` set, a chat offering
tools is answered with a call to its first tool (``stop_reason: tool_use``).

Switches, named as in the other fakes: the canned reply, delays, "fail with status N" (with
headers), "drop the connection after K events", "send an error event after K events", "send
bad JSON after K events". The 401 message echoes the key it got (Anthropic's does not; this
one does so a test can check the adapter scrubs it).
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
THOUGHT = "Let me think about what the user asked."
"""The thinking block's text when thinking is enabled: never part of the answer."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class FakeAnthropicState:
    models: list[str] = field(default_factory=lambda: ["claude-test-1", "claude-test-2"])
    api_key: str = "sk-ant-fake-0000"
    reply: str = DEFAULT_REPLY
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail_status: int | None = None
    fail_message: str = "Internal server error"
    fail_headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    error_after: int | None = None
    error_type: str = "api_error"
    error_message: str = "Internal server error"
    bad_json_after: int | None = None
    refuse: bool = False
    """End the answer with ``stop_reason: refusal`` (the model declined)."""
    tool_input: dict[str, Any] | None = None
    """When set, a chat offering tools whose last turn is not tool results is answered with a
    call to the first tool, with this input: a ``tool_use`` block whose input streams as
    ``input_json_delta`` pieces, and ``stop_reason: tool_use``."""
    tool_preamble: str = ""
    """Text the model says before its call (a text block ahead of the tool_use block)."""
    page_size: int | None = None
    """Cap on models per listing page, to exercise pagination."""
    ratelimit_headers: dict[str, str] = field(
        default_factory=lambda: {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-12-02T03:00:00Z",
        }
    )
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    model_listings: int = 0
    message_requests: int = 0
    """Every ``POST /v1/messages`` that reached the fake, refused ones included."""
    streams_started: int = 0
    streams_completed: int = 0
    aborted_streams: int = 0
    dropped_streams: int = 0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "api_error")
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": message}},
        status_code=status,
        headers={"request-id": "req_fake", **(headers or {})},
    )


def _sse(payload: dict[str, Any] | str, name: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    event = name or (payload["type"] if isinstance(payload, dict) else "message")
    return f"event: {event}\ndata: {data}\n\n".encode()


MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
TOOL_FIELDS = frozenset({"name", "description", "input_schema", "type", "cache_control"})
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def tools_problem(tools: object) -> str | None:
    """What the Messages API would say (400) of a ``tools`` list, or None if it is fine."""
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not TOOL_NAME.match(str(tool.get("name", ""))):
            return (
                f"tools.{index}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{index}.custom.input_schema.type: Input should be 'object'"
        extra = sorted(set(tool) - TOOL_FIELDS)
        if extra:
            return f"tools.{index}.custom.{extra[0]}: Extra inputs are not permitted"
    return None


def _block_problem(where: str, role: str, block: object) -> str | None:
    if not isinstance(block, dict):
        return f"{where}: Input should be a valid dictionary"
    kind = block.get("type")
    if kind == "text":
        if not block.get("text"):
            return f"{where}: text content blocks must be non-empty"
    elif kind == "image":
        source = block.get("source") or {}
        if source.get("type") != "base64" or source.get("media_type") not in MEDIA_TYPES:
            return f"{where}.source: Input tag is not a base64 image of a supported media type"
        try:
            base64.b64decode(source.get("data", ""), validate=True)
        except ValueError:
            return f"{where}.source.base64.data: invalid base64 data"
    elif kind == "tool_use":
        if role != "assistant":
            return f"{where}: tool_use blocks may only appear in assistant messages"
        if not block.get("id") or not isinstance(block.get("input"), dict):
            return f"{where}: tool_use needs an id and an input object"
    elif kind == "tool_result":
        if role != "user":
            return f"{where}: tool_result blocks may only appear in user messages"
    elif kind in ("thinking", "redacted_thinking"):
        if role != "assistant":
            return f"{where}: thinking blocks may only appear in assistant messages"
    else:
        return f"{where}.type: Input tag '{kind}' found is not one of the expected tags"
    return None


def messages_problem(chat: list[dict[str, Any]]) -> str | None:
    """What the Messages API would say (400) of the messages' content blocks: each block's
    shape, and every ``tool_use`` answered by a ``tool_result`` in the very next message,
    which answers no other."""
    for index, message in enumerate(chat):
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return f"messages.{index}.content: Input should be a string or a list of blocks"
        for number, block in enumerate(content):
            problem = _block_problem(f"messages.{index}.content.{number}", message["role"], block)
            if problem is not None:
                return problem
    for index, message in enumerate(chat):
        content = message["content"] if isinstance(message["content"], list) else []
        results = [b["tool_use_id"] for b in content if b.get("type") == "tool_result"]
        if results:
            kinds = [b["type"] for b in content]
            if kinds[: len(results)] != ["tool_result"] * len(results):
                return f"messages.{index}: tool_result blocks must come first in the content"
            before = chat[index - 1] if index else {"content": []}
            asked = before["content"] if isinstance(before["content"], list) else []
            ids = {b["id"] for b in asked if b.get("type") == "tool_use"}
            stray = [r for r in results if r not in ids]
            if stray:
                return (
                    f"messages.{index}.content.0: unexpected `tool_use_id` found in "
                    f"`tool_result` blocks: {stray[0]}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
        uses = [b["id"] for b in content if b.get("type") == "tool_use"]
        if uses and index + 1 < len(chat):
            after = chat[index + 1]["content"]
            answered = (
                {b.get("tool_use_id") for b in after if isinstance(b, dict)}
                if isinstance(after, list)
                else set()
            )
            missing = [u for u in uses if u not in answered]
            if missing:
                return (
                    f"messages.{index + 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {missing[0]}. Each `tool_use` block must have a "
                    "corresponding `tool_result` block in the next message."
                )
    return None


def thinking_problem(chat: list[dict[str, Any]], thinking: object) -> str | None:
    """With thinking on, a conversation continuing a tool loop (its last message holds tool
    results) must replay the assistant's turn starting with its thinking block (400)."""
    if thinking is None or len(chat) < 2:
        return None
    last = chat[-1]["content"]
    if not isinstance(last, list) or not any(b.get("type") == "tool_result" for b in last):
        return None
    turn = chat[-2]["content"]
    first = turn[0].get("type") if isinstance(turn, list) and turn else "text"
    if first in ("thinking", "redacted_thinking"):
        return None
    return (
        f"messages.{len(chat) - 2}.content.0.type: Expected `thinking` or `redacted_thinking`, "
        f"but found `{first}`. When `thinking` is enabled, a final `assistant` message must "
        "start with a thinking block."
    )


def tool_use_events(index: int, name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``tool_use`` block as the API streams it: the id and name with an empty input, the
    input as a JSON string cut in pieces (the first one empty), then the block's stop."""
    text = json.dumps(arguments)
    step = max(1, len(text) // 3)
    pieces = ["", *(text[start : start + step] for start in range(0, len(text), step))]
    block = {"type": "tool_use", "id": "toolu_01Fake", "name": name, "input": {}}
    events: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": index, "content_block": block}
    ]
    events += [
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": piece},
        }
        for piece in pieces
    ]
    events.append({"type": "content_block_stop", "index": index})
    return events


def build_app(state: FakeAnthropicState) -> Starlette:
    def refused(request: Request) -> Response | None:
        state.headers_seen.append(dict(request.headers))
        if state.fail_status is not None:
            return _error(
                state.fail_status,
                state.fail_message,
                {**state.ratelimit_headers, **state.fail_headers},
            )
        key = request.headers.get("x-api-key")
        if key != state.api_key:
            return _error(401, f"invalid x-api-key: {key}")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        return None

    async def models(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        state.model_listings += 1
        limit = min(int(request.query_params.get("limit", "20")), state.page_size or 1000)
        after = request.query_params.get("after_id")
        start = state.models.index(after) + 1 if after in state.models else 0
        page = state.models[start : start + limit]
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": "2025-01-01T00:00:00Z",
            }
            for m in page
        ]
        return JSONResponse(
            {
                "data": data,
                "has_more": start + limit < len(state.models),
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            },
            headers=state.ratelimit_headers,
        )

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
                    error = {"type": state.error_type, "message": state.error_message}
                    yield _sse({"type": "error", "error": error})
                    break
                if state.bad_json_after is not None and index >= state.bad_json_after:
                    yield _sse('{"type": "content_block_delta", "delta": {', "content_block_delta")
                    break
                if event["type"] == "content_block_delta":
                    first = events[index - 1]["type"] != "content_block_delta"
                    await asyncio.sleep(state.first_token_delay if first else state.token_delay)
                yield _sse(event)
            finished = True
            state.streams_completed += 1
        finally:
            if not finished and not dropped:
                state.aborted_streams += 1

    async def messages(request: Request) -> Response:
        state.message_requests += 1
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "There was an error parsing the body of your request")
        state.chat_bodies.append(body)
        model = body.get("model")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return _error(400, "max_tokens: Field required")
        chat = body.get("messages")
        if not isinstance(chat, list) or not chat:
            return _error(400, "messages: at least one message is required")
        for message in chat:
            if message.get("role") not in ("user", "assistant"):
                return _error(
                    400,
                    f'messages: Unexpected role "{message.get("role")}". The Messages API '
                    'accepts a top-level `system` parameter, not "system" as an input '
                    "message role.",
                )
        problem = messages_problem(chat) or thinking_problem(chat, body.get("thinking"))
        if problem is None and "tools" in body:
            problem = tools_problem(body["tools"])
        if problem is not None:
            return _error(400, problem)
        if model not in state.models:
            return _error(404, f"model: {model}")
        thinking = body.get("thinking")
        if thinking is not None:
            # Extended thinking, as documented: a budget of at least 1024 that max_tokens
            # exceeds, and no temperature but the default.
            budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
            if thinking.get("type") != "enabled" or not isinstance(budget, int):
                return _error(400, "thinking: expected {type: enabled, budget_tokens}")
            if budget < 1024:
                return _error(400, "thinking.enabled.budget_tokens: Input should be >= 1024")
            if budget >= body["max_tokens"]:
                return _error(400, "`max_tokens` must be greater than `thinking.budget_tokens`")
            if body.get("temperature", 1) != 1:
                return _error(400, "`temperature` may only be set to 1 when thinking is enabled")
        text, stop_reason, stop_sequence = state.reply, "end_turn", None
        for stop in body.get("stop_sequences") or []:
            if stop in text:
                text, stop_reason, stop_sequence = text[: text.index(stop)], "stop_sequence", stop
        pieces = re.findall(r"\s*\S+", text)
        if len(pieces) > body["max_tokens"]:
            pieces, stop_reason, stop_sequence = pieces[: body["max_tokens"]], "max_tokens", None
        if state.refuse:
            pieces, stop_reason = pieces[:1], "refusal"
        last = chat[-1]["content"]
        answering = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        call_now = state.tool_input is not None and bool(body.get("tools")) and not answering
        if call_now:
            pieces = re.findall(r"\s*\S+", state.tool_preamble)
            stop_reason, stop_sequence = "tool_use", None
        words = sum(len(str(m.get("content", "")).split()) for m in chat)
        input_tokens = words + len(str(body.get("system", "")).split())
        block = 1 if thinking is not None else 0
        events: list[dict[str, Any]] = [
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ]
        if thinking is not None:
            # The thinking block comes first; it is not part of the answer's text.
            events += [
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": ""},
                },
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": THOUGHT},
                },
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9"},
                },
                {"type": "content_block_stop", "index": 0},
            ]
        if pieces or not call_now:
            events += [
                {
                    "type": "content_block_start",
                    "index": block,
                    "content_block": {"type": "text", "text": ""},
                },
                {"type": "ping"},
            ]
            events += [
                {
                    "type": "content_block_delta",
                    "index": block,
                    "delta": {"type": "text_delta", "text": p},
                }
                for p in pieces
            ]
            events.append({"type": "content_block_stop", "index": block})
            block += 1
        if call_now:
            assert state.tool_input is not None
            events += tool_use_events(block, body["tools"][0]["name"], state.tool_input)
        events += [
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": len(pieces) + (len(THOUGHT.split()) if thinking else 0)},
            },
            {"type": "message_stop"},
        ]
        if not body.get("stream"):
            content = [{"type": "text", "text": "".join(pieces)}]
            message = {**events[0]["message"], "content": content, "stop_reason": stop_reason}
            return JSONResponse(message, headers=state.ratelimit_headers)
        return StreamingResponse(
            stream(events), media_type="text/event-stream", headers=state.ratelimit_headers
        )

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/messages", messages, methods=["POST"]),
        ]
    )


@dataclass
class FakeAnthropic:
    url: str
    state: FakeAnthropicState

    def wait_until(
        self, predicate: Callable[[FakeAnthropicState], bool], timeout: float = 5.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state):
                return True
            time.sleep(0.01)
        return predicate(self.state)


@contextmanager
def running_fake_anthropic(**settings: Any) -> Iterator[FakeAnthropic]:
    """Start the fake on a free loopback port; ``settings`` are ``FakeAnthropicState`` fields."""
    state = FakeAnthropicState(**settings)
    with serve_in_thread(build_app(state)) as url:
        yield FakeAnthropic(url=url, state=state)
