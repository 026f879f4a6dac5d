"""The one protocol every backend adapter implements, and the data it streams."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from broker.errors import UnsupportedRequest
from broker.schemas import (
    BackendKind,
    ChatMessage,
    GenerationOptions,
    ModelInfo,
    ToolCall,
    ToolDefinition,
)

__all__ = [
    "KEEP_LOADED_FOREVER",
    "Backend",
    "BackendKind",
    "Chunk",
    "Embedder",
    "Embeddings",
    "ModelManager",
    "PullProgress",
    "embedder",
    "manages_models",
    "model_manager",
    "public_url",
    "refuse_beyond_text",
]

KEEP_LOADED_FOREVER = "-1"
"""The ``keep_alive`` a warm uses unless told otherwise: a warmed model stays until unloaded."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a streamed answer.

    ``text`` is the new text (may be empty on the final chunk). The final chunk has
    ``done=True`` and carries whatever the backend reported about finish reason and usage.
    ``reasoning`` is a thinking model's reasoning, never part of the answer; ``tool_calls``
    are whole calls (an adapter accumulates a call's streamed pieces before yielding it).
    """

    text: str
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Embeddings:
    """A batch of vectors, one per input in the order given, and the tokens the inputs took
    (None when the backend does not say)."""

    vectors: list[list[float]]
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One step of a model download, in Ollama's terms.

    ``status`` is what the backend says it is doing ("pulling manifest", "pulling 6a0746a1ec1a",
    "verifying sha256 digest", "success"). A layer's download carries its ``digest``, its
    ``total`` size in bytes and, once bytes arrive, how many are ``completed``.
    """

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class Backend(Protocol):
    """What every backend does: stream a chat, list its models, say whether it is healthy.

    Health is the inventory: a backend whose ``inventory`` raises is reported unhealthy in the
    node's heartbeat, with the error. Every method raises only ``broker.errors.BackendError``
    subclasses (adapters translate transport errors, httpx's, at this boundary). Cancelling
    the task that iterates ``stream_chat`` must close the backend's HTTP stream, which stops
    the generation.
    """

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> BackendKind: ...

    @property
    def url(self) -> str | None:
        """Scheme, host and port only, safe to publish."""
        ...

    @property
    def capacity(self) -> int:
        """How many requests the backend serves in parallel."""
        ...

    async def inventory(self) -> list[ModelInfo]:
        """Models installed, with ``loaded`` set for those in memory now."""
        ...

    def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        """Stream the answer to a chat; the last chunk has ``done=True``.

        A backend that cannot pass ``tools`` or a message's images on raises
        ``UnsupportedRequest`` rather than dropping them silently."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ModelManager(Backend, Protocol):
    """The optional part: a backend that can pull, warm, unload and remove models (Ollama).

    Adapters that cannot (an OpenAI-compatible server serves what it was started with, a
    cloud provider serves its catalogue) simply do not have these methods; ``model_manager``
    tells the two apart.
    """

    def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        """Download ``model``, yielding progress; the last step's status is "success".

        Closing the generator early (``aclose()``) abandons the download.
        """
        ...

    async def load(self, model: str, keep_alive: str | None = None) -> None:
        """Load ``model`` into memory for ``keep_alive`` (Ollama syntax; None: until unloaded)."""
        ...

    async def unload(self, model: str) -> None:
        """Free the memory ``model`` holds; it stays installed."""
        ...

    async def delete(self, model: str) -> None:
        """Remove ``model`` from the backend's disk (``ModelNotFound`` if it has no such model)."""
        ...


@runtime_checkable
class Embedder(Backend, Protocol):
    """The optional part: a backend that turns texts into vectors (Ollama ``/api/embed``,
    OpenAI-compatible ``/v1/embeddings``, the simulated backend). Which of its models can is
    in their ``embed`` capability."""

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """One vector per input, as one request; raises only ``BackendError`` subclasses.
        Cancelling the awaiting task closes the request."""
        ...


def embedder(backend: Backend) -> Embedder | None:
    """``backend`` as an ``Embedder`` if it can embed, else None."""
    return backend if isinstance(backend, Embedder) else None


def model_manager(backend: Backend) -> ModelManager | None:
    """``backend`` as a ``ModelManager`` if it can manage models, else None."""
    return backend if isinstance(backend, ModelManager) else None


def manages_models(backend: Backend) -> bool:
    return model_manager(backend) is not None


class AdapterIdentity:
    """What every adapter says of itself the same way (``Backend``'s name, kind, url and
    capacity), and an ``aclose`` with nothing to release: the HTTP client an adapter uses is
    injected, and owned and closed by whoever injected it."""

    def __init__(
        self, name: str, kind: BackendKind, *, capacity: int, base_url: str | None = None
    ) -> None:
        self._name = name
        self._kind: BackendKind = kind
        self._capacity = capacity
        self._public_url = public_url(base_url) if base_url is not None else None

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> BackendKind:
        return self._kind

    @property
    def url(self) -> str | None:
        return self._public_url

    @property
    def capacity(self) -> int:
        return self._capacity

    async def aclose(self) -> None:
        """Nothing to release (see the class)."""


def public_url(url: str) -> str:
    """Scheme, host and port of ``url``: no user, password, path or query (they may hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def refuse_beyond_text(
    where: str, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]
) -> None:
    """For an adapter that passes text only: ``UnsupportedRequest`` if the chat carries tools,
    images or tool messages, which it would otherwise drop without a word."""
    if tools or any(m.tool_calls or m.role == "tool" for m in messages):
        raise UnsupportedRequest(f"{where} does not pass tool calls on (not yet in corral)")
    if any(m.images for m in messages):
        raise UnsupportedRequest(f"{where} does not pass images on (not yet in corral)")
