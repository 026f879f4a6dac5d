"""The adapter for OpenAI-compatible servers: llama.cpp server, llama_cpp.server, llamafile,
vLLM, LM Studio on the network, and the providers with the same API (OpenAI, Mistral, DeepSeek).

``inventory`` reads ``GET /v1/models`` (for a local server, also llama.cpp's ``GET /props``
once, for its number of slots when no capacity was configured; a cloud provider's list is
cached, see ``worker.backends.cloud``); ``stream_chat`` posts to ``/v1/chat/completions`` with
``stream: true`` and ``stream_options.include_usage`` and reads Server-Sent Events until
``data: [DONE]``. Failures map onto ``broker.errors`` through ``HttpErrors``; OpenAI's
``insufficient_quota`` 429 is an exhausted quota, any other 429 a rate limit. These servers
serve the models they were started with: the adapter is no ``ModelManager``. The API key
travels only in the ``Authorization`` header: it is never logged and is scrubbed from every
message we build.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from broker.errors import BackendError, BackendProtocolError
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo, ToolCall, ToolDefinition
from worker.backends.base import AdapterIdentity, BackendKind, Chunk, Embeddings
from worker.backends.cloud import ModelCache, RateLimits
from worker.backends.effort import openai_reasoning_effort
from worker.backends.http_errors import (
    ErrorReport,
    HttpErrors,
    Scrubber,
    error_text,
    url_secrets,
)
from worker.backends.images import image_media_type
from worker.backends.openai_embed import post_embeddings
from worker.backends.sse import SSEDecoder, lines_to_the_end

log = logging.getLogger(__name__)

DONE_SENTINEL = "[DONE]"
DEFAULT_CAPACITY = 1
"""Parallel requests assumed when neither the configuration nor the server says."""


# --- the wire format we read (only the fields corral uses) --------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _ListedModel(_Wire):
    id: str


class _ModelList(_Wire):
    data: list[_ListedModel] = Field(default_factory=list)


class _FunctionDelta(_Wire):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(_Wire):
    """A piece of a streamed call: ``index`` says which; the ``id`` and name come once, the
    arguments (a JSON string) in pieces to be joined."""

    index: int = 0
    id: str | None = None
    function: _FunctionDelta = Field(default_factory=_FunctionDelta)


class _Delta(_Wire):
    content: str | None = None
    reasoning_content: str | None = None
    """llama.cpp's and DeepSeek's reasoning text (vLLM says ``reasoning``)."""
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(_Wire):
    delta: _Delta = Field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(_Wire):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _StreamChunk(_Wire):
    """One ``chat.completion.chunk``; with ``include_usage`` the last has no choices, only usage."""

    choices: list[_Choice] = Field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


class _Props(_Wire):
    """llama.cpp server's ``GET /props``: ``total_slots`` is its ``--parallel``."""

    total_slots: int | None = Field(default=None, ge=1)


class _ErrorBody(_Wire):
    """The error shapes these servers use: OpenAI's ``{"error": {"message", "code"}}``,
    a bare ``{"error": "..."}``, vLLM's top-level ``message``, FastAPI's ``detail``."""

    error: Any = None
    message: Any = None
    code: Any = None
    detail: Any = None


# --- helpers -------------------------------------------------------------------------------


def server_root(base_url: str) -> str:
    """``http://host:8080``, ``http://host:8080/`` and ``http://host:8080/v1`` all mean the same."""
    return base_url.rstrip("/").removesuffix("/v1")


def api_root(base_url: str) -> str:
    return f"{server_root(base_url)}/v1"


def openai_message(message: ChatMessage) -> dict[str, object]:
    """One message in the chat completions shape: images as data: URL parts, a call's
    arguments as a JSON string."""
    wire: dict[str, object] = {"role": message.role, "content": message.content}
    if message.images:
        parts: list[dict[str, object]] = [{"type": "text", "text": message.content}]
        parts += [
            {"type": "image_url", "image_url": {"url": f"data:{image_media_type(i)};base64,{i}"}}
            for i in message.images
        ]
        wire["content"] = parts
    if message.tool_calls:
        if not message.content:
            # Optional beside tool_calls; llama_cpp.server refuses a null one.
            del wire["content"]
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool" and message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire


@dataclass
class _CallInProgress:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAccumulator:
    """Joins the pieces of streamed tool calls into whole ``ToolCall``s, in index order."""

    def __init__(self) -> None:
        self._calls: dict[int, _CallInProgress] = {}

    def feed(self, pieces: Sequence[_ToolCallDelta]) -> None:
        for piece in pieces:
            call = self._calls.setdefault(piece.index, _CallInProgress())
            call.id = call.id or piece.id
            call.name += piece.function.name or ""
            if piece.function.arguments:
                call.arguments.append(piece.function.arguments)

    def calls(self) -> tuple[ToolCall, ...]:
        """Raises ValueError if a call has no name or its arguments are not a JSON object."""
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            text = "".join(call.arguments).strip() or "{}"
            arguments = json.loads(text)
            if not isinstance(arguments, dict) or not call.name:
                raise ValueError(f"tool call {index} has no name or no JSON object of arguments")
            out.append(
                ToolCall(
                    id=call.id or f"call_{secrets.token_hex(12)}",
                    name=call.name,
                    arguments=arguments,
                )
            )
        return tuple(out)


def chat_request_body(
    model: str,
    messages: Sequence[ChatMessage],
    options: GenerationOptions,
    kind: BackendKind = "openai",
    tools: Sequence[ToolDefinition] = (),
) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "messages": [openai_message(m) for m in messages],
        "stream": True,
    }
    if tools:
        body["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in tools]
    if kind != "mistral":
        # Ask for the token counts in one last chunk. Servers that do not implement it ignore
        # the field (llama_cpp.server does: tests/worker/test_llama_cpp_server.py), and then
        # the adapter counts the content deltas itself. Mistral refuses any field it does not
        # know (422 extra_forbidden) and sends the usage anyway.
        body["stream_options"] = {"include_usage": True}
    if options.temperature is not None:
        body["temperature"] = options.temperature
    if options.seed is not None:
        body["random_seed" if kind == "mistral" else "seed"] = options.seed
    if options.max_tokens is not None:
        # OpenAI's own API replaced max_tokens, which its reasoning models refuse; the other
        # servers (and Mistral, which refuses the new name) still read max_tokens.
        limit = "max_completion_tokens" if kind == "openai-cloud" else "max_tokens"
        body[limit] = options.max_tokens
    if options.stop:
        body["stop"] = list(options.stop)
    if options.effort is not None and kind == "openai-cloud":
        body["reasoning_effort"] = openai_reasoning_effort(options.effort, model)
    return body


NOT_FOR_CHAT = (
    "whisper",
    "tts",
    "dall-e",
    "moderation",
    "realtime",
    "transcribe",
    "gpt-image",
    "sora",
    "ocr",
    "davinci-002",
    "babbage-002",
)
"""Parts of model ids a provider lists that no chat completion can use (speech, images,
moderation, legacy completions): a cloud listing leaves them out."""


def cloud_model_info(model_id: str) -> ModelInfo | None:
    """A provider's model as corral routes it: embedding models say so, so no chat goes to
    them; models that cannot chat at all are left out (None). A provider's catalogue does not
    say what each model does, so this reads the names (OpenAI's and Mistral's)."""
    lowered = model_id.lower()
    if any(part in lowered for part in NOT_FOR_CHAT):
        return None
    if "embed" in lowered:
        return ModelInfo(name=model_id, loaded=True, capabilities=frozenset({"embed"}))
    return ModelInfo(name=model_id, loaded=True)


def _error_fields(payload: Any) -> tuple[str | None, str | None]:
    """``(message, code)`` from whatever error value a server put in its JSON (the ``type``
    stands in for a missing ``code``: OpenAI sends both, some servers only the type)."""
    if isinstance(payload, dict):
        message = payload.get("message")
        code = payload.get("code") or payload.get("type")
        return (
            str(message) if message is not None else None,
            str(code) if code is not None else None,
        )
    if payload is None:
        return None, None
    return str(payload), None


class OpenAICompatBackend(AdapterIdentity):
    """One OpenAI-compatible server, reached through an injected ``httpx.AsyncClient``.

    These servers keep their models loaded, so every listed model reports ``loaded=True``;
    what a model can do (chat, embeddings, vision) is not in ``/v1/models``, so capabilities
    stay empty. ``capacity=None`` means "ask the server": llama.cpp's server reports its slots
    in ``/props``; any other server counts as ``DEFAULT_CAPACITY``. A cloud ``kind``
    (``openai-cloud``, ``mistral``, ``deepseek``) is never probed for local-server details, its
    model list comes from ``models`` (cached), and its ``x-ratelimit-*`` headers are recorded in
    ``rate_limits``. The client belongs to the caller, so ``aclose`` closes nothing. Cancelling
    the task that iterates ``stream_chat`` (or calling ``aclose()`` on the iterator) closes the
    response, which stops generation on the server.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        client: httpx.AsyncClient,
        capacity: int | None = None,
        api_key: SecretStr | None = None,
        *,
        kind: BackendKind = "openai",
        key_source: str | None = None,
        models: ModelCache | None = None,
        embed_models: Collection[str] = (),
    ) -> None:
        super().__init__(
            name,
            kind,
            capacity=capacity if capacity is not None else DEFAULT_CAPACITY,
            base_url=base_url,
        )
        # A local server's /v1/models does not say which models embed: the configuration does.
        self._embed_models = frozenset(embed_models)
        self._server_root = server_root(base_url)
        self._api_root = api_root(base_url)
        self._client = client
        self._cloud = kind != "openai"
        self._ask_for_slots = capacity is None and not self._cloud
        self._api_key = api_key
        key = api_key.get_secret_value() if api_key is not None else ""
        self._scrub = Scrubber((*url_secrets(base_url), key))
        label = "openai-compatible" if kind == "openai" else kind
        self._errors = HttpErrors(
            backend=name,
            where=f"{label} backend {name!r} at {self._public_url}",
            scrub=self._scrub,
            read_error=self._read_error,
            key_source=key_source,
        )
        self._models = models if models is not None else ModelCache() if self._cloud else None
        self.rate_limits = RateLimits(("x-ratelimit-",))

    async def inventory(self) -> list[ModelInfo]:
        if self._models is not None:
            return await self._models.get(self._list_models)
        models = await self._list_models()
        if self._ask_for_slots:
            await self._learn_slots()
        return models

    async def _list_models(self) -> list[ModelInfo]:
        with self._errors.translating():
            response = await self._client.get(f"{self._api_root}/models", headers=self._headers())
            self.rate_limits.record(response)
            await self._errors.check(response, model=None)
        try:
            listing = _ModelList.model_validate_json(response.content)
        except ValidationError:
            raise self._errors.bad_payload(
                "a /v1/models body that is not a model list", response.text
            ) from None
        if not self._cloud:
            return [
                ModelInfo(name=m.id, loaded=True, capabilities=frozenset({"embed"}))
                if m.id in self._embed_models
                else ModelInfo(name=m.id, loaded=True)
                for m in listing.data
            ]
        return [info for m in listing.data if (info := cloud_model_info(m.id)) is not None]

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        body = chat_request_body(model, messages, options, self._kind, tools)
        calls = ToolCallAccumulator()
        finish_reason: str | None = None
        usage: _Usage | None = None
        deltas = 0
        finished = False
        decoder = SSEDecoder()
        with self._errors.translating():
            # ``async with`` is what makes cancellation work: a CancelledError raised while we
            # wait for the next line unwinds through it and closes the response.
            async with self._client.stream(
                "POST", f"{self._api_root}/chat/completions", json=body, headers=self._headers()
            ) as response:
                self.rate_limits.record(response)
                await self._errors.check(response, model)
                async for line in lines_to_the_end(response.aiter_lines()):
                    event = decoder.feed(line)
                    if event is None or finished:
                        # After [DONE] we only drain the rest of the body, so the connection
                        # goes back to the pool instead of being torn down.
                        continue
                    if event.data.strip() == DONE_SENTINEL:
                        finished = True
                        continue
                    chunk = self._parse_event(event.event, event.data)
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices[:1]:
                        finish_reason = choice.finish_reason or finish_reason
                        delta = choice.delta
                        if delta.tool_calls:
                            calls.feed(delta.tool_calls)
                        reasoning = delta.reasoning_content or delta.reasoning or ""
                        if delta.content or reasoning:
                            deltas += 1
                            yield Chunk(text=delta.content or "", reasoning=reasoning)
        if not finished and finish_reason is None:
            # A clean end of body with neither [DONE] nor a finish reason: the answer is cut.
            raise self._errors.mid_stream("the stream ended before the answer")
        try:
            whole_calls = calls.calls()
        except ValueError as exc:
            raise BackendProtocolError(
                f"{self._errors.where} sent a bad tool call: {exc}"
            ) from None
        # Yielded after the response is closed, so a consumer that stops here leaks nothing.
        yield Chunk(
            text="",
            done=True,
            finish_reason=finish_reason,
            tool_calls=whole_calls,
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            completion_tokens=(
                usage.completion_tokens
                if usage is not None and usage.completion_tokens is not None
                else deltas
            ),
        )

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        return await post_embeddings(
            self._client, self._api_root, self._headers(), self._errors, model, inputs
        )

    # --- internals -------------------------------------------------------------------------

    async def _learn_slots(self) -> None:
        """Take llama.cpp's slot count as the capacity; asked until the server answers at all.

        Other servers answer ``/props`` with a 404 (or without ``total_slots``): they keep the
        default. A transport error leaves the question for the next inventory.
        """
        try:
            with self._errors.translating():
                response = await self._client.get(
                    f"{self._server_root}/props", headers=self._headers()
                )
        except BackendError as exc:
            log.debug("%s: /props not read: %s", self._errors.where, type(exc).__name__)
            return
        self._ask_for_slots = False
        if response.status_code != 200:
            return
        try:
            slots = _Props.model_validate_json(response.content).total_slots
        except ValidationError:
            return
        if slots is not None:
            self._capacity = slots

    def _headers(self) -> dict[str, str]:
        if self._api_key is None or not self._api_key.get_secret_value():
            return {}
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    def _parse_event(self, kind: str, data: str) -> _StreamChunk:
        try:
            chunk = _StreamChunk.model_validate_json(data)
        except ValidationError:
            raise self._errors.bad_payload(
                "an event that is not a chat completion chunk", data
            ) from None
        if kind == "error" or chunk.error is not None:
            message, _ = _error_fields(chunk.error)
            raise self._errors.mid_stream(message or data)
        return chunk

    def _read_error(self, response: httpx.Response) -> ErrorReport:
        try:
            body = _ErrorBody.model_validate_json(response.content)
        except ValidationError:
            body = _ErrorBody()
        message, code = _error_fields(body.error)
        if message is None and body.message is not None:
            message, code = str(body.message), code or _error_fields(body.code)[0]
        if message is None and body.detail is not None:
            message = str(body.detail)
        detail = error_text(response, message, self._scrub)
        lowered = detail.lower()
        says_model_missing = "model" in lowered and (
            "not found" in lowered or "does not exist" in lowered
        )
        missing = code == "model_not_found" or (response.status_code == 404 and says_model_missing)
        return ErrorReport(
            detail, model_missing=missing, quota_exhausted=code == "insufficient_quota"
        )
