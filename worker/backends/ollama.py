"""The Ollama adapter: Ollama's native ``/api`` endpoints, with NDJSON streaming.

``inventory`` reads ``GET /api/tags`` (installed) and ``GET /api/ps`` (in memory now);
``stream_chat`` posts to ``/api/chat`` and turns each JSON line into a ``Chunk``. Every httpx
error is translated into the ``broker.errors.BackendError`` tree here, and no message carries
more of the URL than ``public_url`` gives (the base URL may hold basic-auth credentials).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
)
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from worker.backends.base import BackendKind, Chunk, public_url

_MAX_DETAIL = 300
"""Longest piece of a backend's own words we copy into an error message."""


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


def _url_secrets(url: str) -> tuple[str, ...]:
    """The parts of ``url`` that must never reach a message, longest first.

    httpx rarely quotes a URL in its errors, but a proxy or a future version might: scrubbing
    these is cheap insurance. Very short passwords are left out, since replacing "ab" would
    mangle every message while hiding nothing an attacker could not guess.
    """
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    candidates = (f"{userinfo}@" if userinfo else "", parts.query, parts.password or "")
    return tuple(sorted({c for c in candidates if len(c) >= 4}, key=len, reverse=True))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


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
        self._secrets = _url_secrets(base_url)

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
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise self._transport_error(exc) from None
        if final is None:
            raise BackendProtocolError(
                f"ollama backend {self._name!r} at {self._public_url} ended the stream "
                "without its final 'done' line"
            )
        # Yielded after the response is closed, so a consumer that stops here leaks nothing.
        yield final

    # --- internals -------------------------------------------------------------------------

    async def _get_models(self, path: str) -> list[_ListedModel]:
        try:
            response = await self._client.get(f"{self._base_url}{path}")
            await self._check_status(response, model=None)
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise self._transport_error(exc) from None
        try:
            listing = _ModelList.model_validate_json(response.content)
        except ValidationError:
            raise BackendProtocolError(
                f"ollama backend {self._name!r} at {self._public_url} answered {path} "
                "with a body that is not Ollama's model list"
            ) from None
        return listing.models or []

    async def _check_status(self, response: httpx.Response, model: str | None) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        detail = self._error_detail(response)
        if (
            response.status_code == 404
            and model is not None
            and "model" in detail.lower()
            and "not found" in detail.lower()
        ):
            # A plain 404 ("404 page not found") means a wrong base URL, not a missing model.
            raise ModelNotFound(f"model {model!r} not found on backend {self._name!r}")
        raise BackendProtocolError(
            f"ollama backend {self._name!r} at {self._public_url} answered "
            f"HTTP {response.status_code}: {detail}"
        )

    def _error_detail(self, response: httpx.Response) -> str:
        """The ``error`` field of Ollama's ``{"error": "..."}`` body, or the start of the text."""
        try:
            message = _ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            message = None
        text = message if message is not None else response.text
        return self._scrub(_clip(text)) or response.reason_phrase

    def _parse_line(self, line: str) -> _ChatLine:
        try:
            parsed = _ChatLine.model_validate_json(line)
        except ValidationError:
            raise BackendProtocolError(
                f"ollama backend {self._name!r} at {self._public_url} sent a line that is "
                f"not a chat response: {_clip(line)!r}"
            ) from None
        if parsed.error is not None:
            # Ollama reports a failure after the 200 header as one last ``{"error": ...}`` line.
            raise BackendProtocolError(
                f"ollama backend {self._name!r} failed mid-stream: "
                f"{self._scrub(_clip(parsed.error))}"
            )
        return parsed

    def _transport_error(self, exc: Exception) -> BackendError:
        where = f"ollama backend {self._name!r} at {self._public_url}"
        reason = self._scrub(_clip(str(exc))) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return BackendTimeout(f"{where} timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.ConnectError | httpx.ProxyError):
            return BackendUnavailable(f"cannot connect to {where}: {reason}")
        if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
            return BackendUnavailable(f"connection to {where} dropped: {reason}")
        return BackendProtocolError(f"{where}: {type(exc).__name__}: {reason}")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
