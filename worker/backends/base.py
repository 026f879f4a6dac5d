"""The one protocol every backend adapter implements, and the data it streams."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from broker.errors import UnsupportedOperation
from broker.schemas import (
    ChatMessage,
    GenerationOptions,
    ModelInfo,
)

BackendKind = Literal["ollama", "openai", "simulated"]

KEEP_LOADED_FOREVER = "-1"
"""The ``keep_alive`` a warm uses unless told otherwise: a warmed model stays until unloaded."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a streamed answer.

    ``text`` is the new text (may be empty on the final chunk). The final chunk has
    ``done=True`` and carries whatever the backend reported about finish reason and usage.
    """

    text: str
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


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
    """A node-local LLM server as the worker sees it.

    Every method raises only ``broker.errors.BackendError`` subclasses (adapters translate
    transport errors, httpx's, at this boundary), except that the model lifecycle methods of
    a backend whose ``manages_models`` is False raise ``UnsupportedOperation``. Cancelling the
    task that iterates ``stream_chat`` or ``pull`` must close the backend's HTTP stream, which
    stops the generation or the download.
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
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        """Stream the answer to a chat; the last chunk has ``done=True``."""
        ...

    async def aclose(self) -> None: ...

    # --- the model lifecycle: pull / warm / unload / rm ------------------------------------
    # Optional in practice: an adapter whose server cannot do these (an OpenAI-compatible
    # server serves the models it was started with) says False here and raises
    # UnsupportedOperation from each method; ``NoModelLifecycle`` does exactly that.

    @property
    def manages_models(self) -> bool:
        """Whether ``pull``, ``load``, ``unload`` and ``delete`` work on this backend."""
        ...

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


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> BackendKind: ...


class NoModelLifecycle:
    """The lifecycle half of ``Backend`` for adapters that cannot manage models.

    Every operation raises UnsupportedOperation naming the backend and its kind, so the user
    learns which backend said no, and why.
    """

    @property
    def manages_models(self) -> bool:
        return False

    def pull(self: _Named, model: str) -> AsyncGenerator[PullProgress, None]:
        raise unsupported(self, "pull")

    async def load(self: _Named, model: str, keep_alive: str | None = None) -> None:
        raise unsupported(self, "load")

    async def unload(self: _Named, model: str) -> None:
        raise unsupported(self, "unload")

    async def delete(self: _Named, model: str) -> None:
        raise unsupported(self, "delete")


def unsupported(backend: _Named, action: str) -> UnsupportedOperation:
    return UnsupportedOperation(
        f"{backend.kind} backend {backend.name!r} cannot {action} models: it serves the models "
        "its server was started with (an ollama backend can pull, warm, unload and remove them)"
    )


def public_url(url: str) -> str:
    """Scheme, host and port of ``url``: no user, password, path or query (they may hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"
