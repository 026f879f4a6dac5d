"""The Ollama adapter: Ollama's native ``/api`` endpoints, with NDJSON streaming.

``inventory`` reads ``GET /api/tags`` (installed) and ``GET /api/ps`` (in memory now);
``stream_chat`` posts to ``/api/chat`` and turns each JSON line into a ``Chunk``. Every httpx
error is translated into the ``broker.errors.BackendError`` tree here, and no message carries
more of the URL than ``public_url`` gives (the base URL may hold basic-auth credentials).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import BackendProtocolError
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from worker.backends.base import BackendKind, Chunk, public_url
from worker.backends.http_errors import (
    TRANSPORT_ERRORS,
    ErrorReport,
    Scrubber,
    check_status,
    clip,
    error_text,
    transport_error,
    url_secrets,
)

# --- the wire format we read (only the fields corral uses; Ollama adds more over time) -----


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Details(_Wire):
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class _ListedModel(_Wire):
    name: str = ""
    model: str = ""
    size: int | None = None
    details: _Details = Field(default_factory=_Details)

    @property
    def key(self) -> str:
        return self.name or self.model


class _ModelList(_Wire):
    """The body of both ``/api/tags`` and ``/api/ps``."""

    models: list[_ListedModel] | None = None


class _LineMessage(_Wire):
    content: str = ""


class _ChatLine(_Wire):
    """One NDJSON line of ``/api/chat``; the last has ``done`` and the counters."""

    message: _LineMessage | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None


class _ErrorBody(_Wire):
    error: str | None = None


# --- helpers -------------------------------------------------------------------------------


def canonical_model_name(name: str) -> str:
    """Ollama's own reading of a model name: no tag means ``:latest``."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def ollama_options(options: GenerationOptions) -> dict[str, object]:
    """corral's sampling options in Ollama's ``options`` vocabulary (Modelfile parameters)."""
    mapped: dict[str, object] = {}
    if options.temperature is not None:
        mapped["temperature"] = options.temperature
    if options.seed is not None:
        mapped["seed"] = options.seed
    if options.max_tokens is not None:
        mapped["num_predict"] = options.max_tokens
    if options.stop:
        mapped["stop"] = list(options.stop)
    return mapped


class OllamaBackend:
    """One Ollama server, reached through an injected ``httpx.AsyncClient``.

    The client belongs to the caller (one pooled client serves every adapter of a node), so
    ``aclose`` closes nothing. Iterate ``stream_chat`` to its end, or cancel the task / call
    ``aclose()`` on the iterator: either way the HTTP response is closed, which is how Ollama
    learns to stop generating.
    """

    def __init__(
        self, name: str, base_url: str, client: httpx.AsyncClient, capacity: int = 1
    ) -> None:
        self._name = name
        self._base_url = base_url.rstrip("/")
        self._client = client
        self._capacity = capacity
        self._public_url = public_url(base_url)
        self._where = f"ollama backend {name!r} at {self._public_url}"
        self._scrub = Scrubber(url_secrets(base_url))

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> BackendKind:
        return "ollama"

    @property
    def url(self) -> str:
        return self._public_url

    @property
    def capacity(self) -> int:
        return self._capacity

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is owned, and closed, by whoever injected it."""

    async def inventory(self) -> list[ModelInfo]:
        installed = await self._get_models("/api/tags")
        loaded = {canonical_model_name(m.key) for m in await self._get_models("/api/ps")}
        return [
            ModelInfo(
                name=m.key,
                loaded=canonical_model_name(m.key) in loaded,
                size_bytes=m.size,
                family=m.details.family,
                parameter_size=m.details.parameter_size,
                quantization=m.details.quantization_level,
            )
            for m in installed
            if m.key
        ]

    async def stream_chat(
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        mapped = ollama_options(options)
        if mapped:
            body["options"] = mapped
        final: Chunk | None = None
        try:
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
                    text = parsed.message.content if parsed.message is not None else ""
                    if parsed.done:
                        final = Chunk(
                            text=text,
                            done=True,
                            finish_reason=parsed.done_reason,
                            prompt_tokens=parsed.prompt_eval_count,
                            completion_tokens=parsed.eval_count,
                        )
                    elif text:
                        # Lines without content (a thinking model's reasoning, tool calls)
                        # carry nothing a chat delta can show.
                        yield Chunk(text=text)
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self._where, self._scrub) from None
        if final is None:
            raise BackendProtocolError(
                f"{self._where} ended the stream without its final 'done' line"
            )
        # Yielded after the response is closed, so a consumer that stops here leaks nothing.
        yield final

    # --- internals -------------------------------------------------------------------------

    async def _get_models(self, path: str) -> list[_ListedModel]:
        try:
            response = await self._client.get(f"{self._base_url}{path}")
            await self._check_status(response, model=None)
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self._where, self._scrub) from None
        try:
            listing = _ModelList.model_validate_json(response.content)
        except ValidationError:
            raise BackendProtocolError(
                f"{self._where} answered {path} with a body that is not Ollama's model list"
            ) from None
        return listing.models or []

    async def _check_status(self, response: httpx.Response, model: str | None) -> None:
        await check_status(
            response,
            backend=self._name,
            where=self._where,
            model=model,
            read_error=self._read_error,
        )

    def _read_error(self, response: httpx.Response) -> ErrorReport:
        """The ``error`` field of Ollama's ``{"error": "..."}`` body, or the start of the text."""
        try:
            message = _ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            message = None
        detail = error_text(response, message, self._scrub)
        lowered = detail.lower()
        # A plain 404 ("404 page not found") means a wrong base URL, not a missing model.
        missing = response.status_code == 404 and "model" in lowered and "not found" in lowered
        return ErrorReport(detail, model_missing=missing)

    def _parse_line(self, line: str) -> _ChatLine:
        try:
            parsed = _ChatLine.model_validate_json(line)
        except ValidationError:
            raise BackendProtocolError(
                f"{self._where} sent a line that is not a chat response: {clip(line)!r}"
            ) from None
        if parsed.error is not None:
            # Ollama reports a failure after the 200 header as one last ``{"error": ...}`` line.
            raise BackendProtocolError(
                f"ollama backend {self._name!r} failed mid-stream: "
                f"{self._scrub.detail(parsed.error)}"
            )
        return parsed
