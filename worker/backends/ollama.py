"""The Ollama adapter: Ollama's native ``/api`` endpoints, with NDJSON streaming.

``inventory`` reads ``GET /api/tags`` (installed), ``GET /api/ps`` (in memory now, until when)
and, once per model version, ``POST /api/show`` (capabilities, context length).
``stream_chat`` posts to ``/api/chat`` and turns each JSON line into a ``Chunk``. The model
lifecycle: ``pull`` streams ``/api/pull``; ``load`` and ``unload`` post an empty
``/api/generate`` with a ``keep_alive``; ``delete`` is ``DELETE /api/delete``. Every httpx error
is translated into the ``broker.errors.BackendError`` tree here, and no message carries more of
the URL than ``public_url`` gives (the base URL may hold basic-auth credentials).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from broker.errors import BackendError, BackendProtocolError, ModelNotFound, ModelOpError
from broker.schemas import (
    ChatMessage,
    GenerationOptions,
    ModelInfo,
    ToolDefinition,
    canonical_model_name,
)
from worker.backends.base import (
    KEEP_LOADED_FOREVER,
    AdapterIdentity,
    Chunk,
    Embeddings,
    PullProgress,
)
from worker.backends.effort import ollama_think
from worker.backends.http_errors import (
    ErrorReport,
    HttpErrors,
    Scrubber,
    error_text,
    url_secrets,
)
from worker.backends.ollama_wire import (
    UNKNOWN_FACTS,
    ChatLine,
    EmbedResponse,
    ErrorBody,
    ListedModel,
    ModelFacts,
    ModelList,
    PullLine,
    ShowResponse,
    facts_from_show,
    loaded_until_from,
    ollama_keep_alive,
    ollama_message,
    ollama_options,
    tool_calls_from,
)

__all__ = ["OllamaBackend", "canonical_model_name", "ollama_options"]

log = logging.getLogger(__name__)


def _new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


_BodyT = TypeVar("_BodyT", bound=BaseModel)

SHOW_RETRY_S = 60.0
"""After ``/api/show`` fails for a model, how long its capabilities stay unknown before the
next try (instead of asking again, and logging again, on every heartbeat)."""

_PULL_SUCCESS = "success"


class OllamaBackend(AdapterIdentity):
    """One Ollama server, reached through an injected ``httpx.AsyncClient``.

    The client belongs to the caller (one pooled client serves every adapter of a node), so
    ``aclose`` closes nothing. Iterate ``stream_chat`` (or ``pull``) to its end, or cancel the
    task / call ``aclose()`` on the iterator: either way the HTTP response is closed, which is
    how Ollama learns to stop generating (or downloading).
    """

    def __init__(
        self, name: str, base_url: str, client: httpx.AsyncClient, capacity: int = 1
    ) -> None:
        super().__init__(name, "ollama", capacity=capacity, base_url=base_url)
        self._base_url = base_url.rstrip("/")
        self._client = client
        self._where = f"ollama backend {name!r} at {self._public_url}"
        self._scrub = Scrubber(url_secrets(base_url))
        self._errors = HttpErrors(
            backend=name, where=self._where, scrub=self._scrub, read_error=self._read_error
        )
        # /api/show answers are cached by the model's digest: the heartbeat lists models every
        # couple of seconds, and a model's capabilities change only when its digest does.
        self._facts: dict[str, ModelFacts] = {}
        self._show_retry_at: dict[str, float] = {}

    # --- inventory ---------------------------------------------------------------------------

    async def inventory(self) -> list[ModelInfo]:
        installed, running = await asyncio.gather(
            self._get_models("/api/tags"), self._get_models("/api/ps")
        )
        installed = [m for m in installed if m.key]
        in_memory = {canonical_model_name(m.key): m for m in running if m.key}
        facts = await asyncio.gather(*(self._facts_for(m) for m in installed))
        self._forget_facts_except({_facts_key(m) for m in installed})
        now = time.time()
        models = []
        for listed, known in zip(installed, facts, strict=True):
            loaded = in_memory.get(canonical_model_name(listed.key))
            models.append(
                ModelInfo(
                    name=listed.key,
                    loaded=loaded is not None,
                    size_bytes=listed.size,
                    family=listed.details.family,
                    parameter_size=listed.details.parameter_size,
                    quantization=listed.details.quantization_level,
                    context_length=known.context_length,
                    capabilities=known.capabilities,
                    loaded_until=loaded_until_from(loaded.expires_at, now) if loaded else None,
                    loaded_bytes=loaded.size if loaded else None,
                    loaded_vram_bytes=loaded.size_vram if loaded else None,
                )
            )
        return models

    async def _facts_for(self, listed: ListedModel) -> ModelFacts:
        key = _facts_key(listed)
        cached = self._facts.get(key)
        if cached is not None:
            return cached
        if time.monotonic() < self._show_retry_at.get(key, 0.0):
            return UNKNOWN_FACTS
        try:
            facts = facts_from_show(await self._show(listed.key))
        except ModelNotFound:
            return UNKNOWN_FACTS  # removed between /api/tags and /api/show: gone next time
        except BackendError as exc:
            # The model is still listed, only its capabilities are unknown for now: that is
            # not worth failing the whole inventory (and the node's health) over.
            log.warning("no details for model %r from %s: %s", listed.key, self._where, exc)
            self._show_retry_at[key] = time.monotonic() + SHOW_RETRY_S
            return UNKNOWN_FACTS
        self._facts[key] = facts
        return facts

    def _forget_facts_except(self, keys: set[str]) -> None:
        """Drop cached answers for models no longer installed, so the cache cannot grow."""
        for cache in (self._facts, self._show_retry_at):
            for stale in cache.keys() - keys:
                del cache[stale]

    async def _show(self, model: str) -> ShowResponse:
        response = await self._request("POST", "/api/show", model, json={"model": model})
        return self._parse(ShowResponse, response.content, "/api/show")

    # --- chat ----------------------------------------------------------------------------------

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        body: dict[str, object] = {
            "model": model,
            "messages": [ollama_message(m) for m in messages],
            "stream": True,
        }
        if tools:
            body["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in tools]
        if options.think is not None:
            body["think"] = options.think
        mapped = ollama_options(options)
        if mapped:
            body["options"] = mapped
        if options.effort is not None:
            body["think"] = ollama_think(options.effort, model)
        final: Chunk | None = None
        with self._errors.translating():
            # ``async with`` is what makes cancellation work: a CancelledError raised while we
            # wait for the next line unwinds through it and closes the response.
            async with self._client.stream(
                "POST", f"{self._base_url}/api/chat", json=body
            ) as response:
                await self._check_status(response, model)
                async for line in response.aiter_lines():
                    if final is not None or not line.strip():
                        # After ``done`` we only drain the (empty) rest of the body, so the
                        # connection goes back to the pool instead of being torn down.
                        continue
                    parsed = self._parse_line(line)
                    message = parsed.message
                    text = message.content if message is not None else ""
                    thinking = message.thinking if message is not None else ""
                    calls = tool_calls_from(message, _new_call_id)
                    if parsed.done:
                        final = Chunk(
                            text=text,
                            done=True,
                            finish_reason=parsed.done_reason,
                            prompt_tokens=parsed.prompt_eval_count,
                            completion_tokens=parsed.eval_count,
                            reasoning=thinking,
                            tool_calls=calls,
                        )
                    elif text or thinking or calls:
                        yield Chunk(text=text, reasoning=thinking, tool_calls=calls)
        if final is None:
            raise BackendProtocolError(
                f"{self._where} ended the stream without its final 'done' line"
            )
        # Yielded after the response is closed, so a consumer that stops here leaks nothing.
        yield final

    # --- embeddings ----------------------------------------------------------------------------

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """``POST /api/embed`` with the whole batch as ``input``."""
        body = {"model": model, "input": list(inputs)}
        response = await self._request("POST", "/api/embed", model, json=body)
        parsed = self._parse(EmbedResponse, response.content, "/api/embed")
        return Embeddings(parsed.embeddings, parsed.prompt_eval_count)

    # --- the model lifecycle -------------------------------------------------------------------

    async def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        succeeded = False
        with self._errors.translating():
            # The response stays open while the consumer handles each step; closing this
            # generator early closes it, and Ollama abandons the download.
            async with self._client.stream(
                "POST", f"{self._base_url}/api/pull", json={"model": model, "stream": True}
            ) as response:
                await self._check_status(response, model)
                async for line in response.aiter_lines():
                    if succeeded or not line.strip():
                        continue
                    step = self._parse_pull_line(line, model)
                    succeeded = step.status == _PULL_SUCCESS
                    yield PullProgress(
                        status=step.status,
                        digest=step.digest,
                        total=step.total,
                        completed=step.completed,
                    )
        if not succeeded:
            raise BackendProtocolError(
                f"{self._where} ended the pull of {model!r} without reporting success"
            )

    async def load(self, model: str, keep_alive: str | None = None) -> None:
        try:
            wire_keep_alive = ollama_keep_alive(keep_alive or KEEP_LOADED_FOREVER)
        except ValueError as exc:
            raise ModelOpError(str(exc)) from None
        body: dict[str, object] = {"model": model, "keep_alive": wire_keep_alive, "stream": False}
        with self._errors.translating():
            response = await self._client.post(f"{self._base_url}/api/generate", json=body)
            if response.status_code == 400 and "does not support generate" in response.text:
                # An embedding-only model refuses /api/generate; an empty /api/embed loads it.
                body = {"model": model, "input": [], "keep_alive": wire_keep_alive}
                response = await self._client.post(f"{self._base_url}/api/embed", json=body)
            await self._check_status(response, model)

    async def unload(self, model: str) -> None:
        # Ollama unloads on an empty prompt with keep_alive 0, before it checks what the model
        # can do, so this works for embedding models too.
        body = {"model": model, "keep_alive": 0, "stream": False}
        await self._request("POST", "/api/generate", model, json=body)

    async def delete(self, model: str) -> None:
        await self._request("DELETE", "/api/delete", model, json={"model": model})

    # --- internals -------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, model: str | None, json: object
    ) -> httpx.Response:
        with self._errors.translating():
            response = await self._client.request(method, f"{self._base_url}{path}", json=json)
            await self._check_status(response, model)
        return response

    async def _get_models(self, path: str) -> list[ListedModel]:
        with self._errors.translating():
            response = await self._client.get(f"{self._base_url}{path}")
            await self._check_status(response, model=None)
        listing = self._parse(ModelList, response.content, path)
        return listing.models or []

    def _parse(self, shape: type[_BodyT], content: bytes, path: str) -> _BodyT:
        try:
            return shape.model_validate_json(content)
        except ValidationError:
            raise BackendProtocolError(
                f"{self._where} answered {path} with a body that is not Ollama's"
            ) from None

    async def _check_status(self, response: httpx.Response, model: str | None) -> None:
        await self._errors.check(response, model)

    def _read_error(self, response: httpx.Response) -> ErrorReport:
        """The ``error`` field of Ollama's ``{"error": "..."}`` body, or the start of the text."""
        try:
            message = ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            message = None
        detail = error_text(response, message, self._scrub)
        lowered = detail.lower()
        # A plain 404 ("404 page not found") means a wrong base URL, not a missing model.
        missing = response.status_code == 404 and "model" in lowered and "not found" in lowered
        return ErrorReport(detail, model_missing=missing)

    def _parse_line(self, line: str) -> ChatLine:
        try:
            parsed = ChatLine.model_validate_json(line)
        except ValidationError:
            raise self._errors.bad_payload("a line that is not a chat response", line) from None
        if parsed.error is not None:
            # Ollama reports a failure after the 200 header as one last ``{"error": ...}`` line.
            raise self._errors.mid_stream(parsed.error)
        return parsed

    def _parse_pull_line(self, line: str, model: str) -> PullLine:
        try:
            parsed = PullLine.model_validate_json(line)
        except ValidationError:
            raise self._errors.bad_payload("a line that is not pull progress", line) from None
        if parsed.error is not None:
            detail = self._scrub.detail(parsed.error)
            # "pull model manifest: file does not exist": the library has no such model/tag.
            if "file does not exist" in detail or "not found" in detail.lower():
                raise ModelNotFound(
                    f"model {model!r} not found in the registry "
                    f"(ollama backend {self._name!r}: {detail})"
                )
            raise BackendProtocolError(
                f"ollama backend {self._name!r} failed to pull {model!r}: {detail}"
            )
        return parsed


def _facts_key(listed: ListedModel) -> str:
    # The digest names the model's content; the name stands in on servers that omit it.
    return listed.digest or canonical_model_name(listed.key)
