"""The adapter for Anthropic's Messages API, in its own wire format.

``stream_chat`` posts to ``/v1/messages`` with ``stream: true`` (the body, tools and images
included, is built in ``anthropic_wire``); the key travels in ``x-api-key`` with an
``anthropic-version`` header. The answer is a Server-Sent Events sequence: ``message_start``
(input tokens), per content block ``content_block_start`` / ``content_block_delta`` (text, or
a ``tool_use`` block's input in ``input_json_delta`` pieces, yielded as one whole call at its
``content_block_stop``) / ``content_block_stop``, ``message_delta`` (stop reason, output
tokens), ``message_stop``, with ``ping`` events anywhere. An ``error`` event
(``overloaded_error`` and the like) may come at any point, also after the 200 header.
``inventory`` reads ``GET /v1/models`` (cached).
Anthropic has no sampling seed: ``seed`` is not sent. ``effort`` becomes a ``thinking`` budget
(its ``thinking_delta`` blocks are not part of the answer, so they are not streamed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from broker.errors import BackendError, BackendProtocolError, ContentBlocked
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo, ToolCall, ToolDefinition
from worker.backends.anthropic_wire import messages_request_body
from worker.backends.base import AdapterIdentity, Chunk
from worker.backends.cloud import ModelCache, RateLimits
from worker.backends.http_errors import ErrorReport, HttpErrors, Scrubber, error_text, url_secrets
from worker.backends.sse import SSEDecoder, lines_to_the_end

__all__ = ["ANTHROPIC_VERSION", "AnthropicBackend", "messages_request_body"]

ANTHROPIC_VERSION = "2023-06-01"
LIST_PAGE = 1000

ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
"""Anthropic's error types and the HTTP status each stands for (an ``error`` event in a
stream has only the type)."""

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Usage(_Wire):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Message(_Wire):
    usage: _Usage = Field(default_factory=_Usage)


class _Delta(_Wire):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    """A piece of a ``tool_use`` block's input (``input_json_delta``): JSON once all joined."""
    stop_reason: str | None = None


class _ContentBlock(_Wire):
    type: str = ""
    id: str | None = None
    name: str | None = None


class _Error(_Wire):
    type: str = ""
    message: str = ""


class _Event(_Wire):
    type: str
    index: int = 0
    content_block: _ContentBlock | None = None
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _Error | None = None


@dataclass
class _ToolUse:
    """A ``tool_use`` block being streamed: its id and name came first, its input comes in
    ``input_json_delta`` pieces."""

    id: str
    name: str
    pieces: list[str] = field(default_factory=list)


class _ErrorBody(_Wire):
    error: _Error | None = None


class _ListedModel(_Wire):
    id: str


class _ModelPage(_Wire):
    data: list[_ListedModel] = Field(default_factory=list)
    has_more: bool = False
    last_id: str | None = None


class AnthropicBackend(AdapterIdentity):
    """Anthropic's API (or anything speaking it) through an injected ``httpx.AsyncClient``."""

    def __init__(
        self,
        name: str,
        base_url: str,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        *,
        key_source: str,
        capacity: int = 4,
        max_tokens: int = 4096,
        version: str = ANTHROPIC_VERSION,
        models: ModelCache | None = None,
    ) -> None:
        super().__init__(name, "anthropic", capacity=capacity, base_url=base_url)
        self._base_url = base_url.rstrip("/").removesuffix("/v1")
        self._client = client
        self._api_key = api_key
        self._max_tokens = max_tokens
        self._version = version
        self._scrub = Scrubber((*url_secrets(base_url), api_key.get_secret_value()))
        self._errors = HttpErrors(
            backend=name,
            where=f"anthropic backend {name!r} at {self._public_url}",
            scrub=self._scrub,
            read_error=self._read_error,
            key_source=key_source,
        )
        self._models = models or ModelCache()
        self.rate_limits = RateLimits(("anthropic-ratelimit-", "retry-after"))

    async def inventory(self) -> list[ModelInfo]:
        return await self._models.get(self._list_models)

    async def _list_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        params: dict[str, str | int] = {"limit": LIST_PAGE}
        while True:
            with self._errors.translating():
                response = await self._client.get(
                    f"{self._base_url}/v1/models", params=params, headers=self._headers()
                )
                self.rate_limits.record(response)
                await self._errors.check(response, model=None)
            try:
                page = _ModelPage.model_validate_json(response.content)
            except ValidationError:
                raise self._errors.bad_payload(
                    "a model list it cannot read", response.text
                ) from None
            models += [ModelInfo(name=m.id, loaded=True) for m in page.data]
            if not page.has_more or not page.last_id:
                return models
            params["after_id"] = page.last_id

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        body = messages_request_body(model, messages, options, self._max_tokens, tools)
        decoder = SSEDecoder()
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        stop_reason: str | None = None
        stopped = False
        uses: dict[int, _ToolUse] = {}  # the tool_use blocks open now, by block index
        with self._errors.translating():
            async with self._client.stream(
                "POST", f"{self._base_url}/v1/messages", json=body, headers=self._headers()
            ) as response:
                self.rate_limits.record(response)
                await self._errors.check(response, model)
                async for line in lines_to_the_end(response.aiter_lines()):
                    sse = decoder.feed(line)
                    if sse is None or stopped:
                        continue
                    event = self._parse(sse.data)
                    if event.type == "error":
                        raise self._stream_error(event.error, model)
                    if event.type == "message_start" and event.message is not None:
                        prompt_tokens = event.message.usage.input_tokens
                    elif event.type == "content_block_start" and event.content_block is not None:
                        block = event.content_block
                        if block.type == "tool_use":
                            uses[event.index] = _ToolUse(block.id or "", block.name or "")
                    elif event.type == "content_block_delta" and event.delta is not None:
                        if event.delta.type == "text_delta" and event.delta.text:
                            yield Chunk(text=event.delta.text)
                        elif event.delta.type == "input_json_delta" and event.index in uses:
                            uses[event.index].pieces.append(event.delta.partial_json or "")
                    elif event.type == "content_block_stop" and event.index in uses:
                        call = self._whole_call(uses.pop(event.index))
                        yield Chunk(text="", tool_calls=(call,))
                    elif event.type == "message_delta":
                        if event.delta is not None and event.delta.stop_reason:
                            stop_reason = event.delta.stop_reason
                        if event.usage is not None and event.usage.output_tokens is not None:
                            completion_tokens = event.usage.output_tokens
                    elif event.type == "message_stop":
                        stopped = True
        if not stopped:
            raise self._errors.mid_stream("the stream ended before message_stop")
        if stop_reason == "refusal":
            raise ContentBlocked(f"{self._errors.where} refused to answer (stop_reason refusal)")
        yield Chunk(
            text="",
            done=True,
            finish_reason=FINISH_REASONS.get(stop_reason or "", stop_reason),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    # --- internals -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key.get_secret_value(), "anthropic-version": self._version}

    def _parse(self, data: str) -> _Event:
        try:
            return _Event.model_validate_json(data)
        except ValidationError:
            raise self._errors.bad_payload(
                "an event that is not a Messages stream event", data
            ) from None

    def _whole_call(self, use: _ToolUse) -> ToolCall:
        """A finished ``tool_use`` block as a call; its input must be a JSON object."""
        text = "".join(use.pieces).strip() or "{}"
        try:
            arguments = json.loads(text)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict) or not use.id or not use.name:
            raise BackendProtocolError(
                f"{self._errors.where} sent a bad tool_use block (id {use.id!r}, name"
                f" {use.name!r}): its input is not a JSON object"
            )
        try:
            return ToolCall(id=use.id, name=use.name, arguments=arguments)
        except ValidationError as exc:
            raise BackendProtocolError(
                f"{self._errors.where} sent a tool_use block corral cannot carry: "
                f"{exc.errors()[0]['msg']}"
            ) from None

    def _stream_error(self, error: _Error | None, model: str) -> BackendError:
        """An ``error`` event after the 200 header, mapped as its HTTP status would be."""
        kind = error.type if error is not None else ""
        message = self._scrub.detail(error.message if error is not None else "") or kind
        status = ERROR_STATUS.get(kind)
        if status is None:
            return self._errors.mid_stream(f"{kind}: {message}")
        report = ErrorReport(f"{kind}: {message}", model_missing=status == 404)
        return self._errors.in_stream(status, report, model)

    def _read_error(self, response: httpx.Response) -> ErrorReport:
        try:
            error = _ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            error = None
        message = f"{error.type}: {error.message}" if error is not None else None
        detail = error_text(response, message, self._scrub)
        missing = response.status_code == 404 and error is not None and "model" in error.message
        return ErrorReport(detail, model_missing=missing)
