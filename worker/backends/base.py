"""The one protocol every backend adapter implements, and the chunk it streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from broker.schemas import ChatMessage, GenerationOptions, ModelInfo

BackendKind = Literal["ollama", "openai", "simulated"]


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


class Backend(Protocol):
    """A node-local LLM server as the worker sees it.

    Every method raises only ``broker.errors.BackendError`` subclasses: adapters translate
    transport errors (httpx) at this boundary. Cancelling the task that iterates
    ``stream_chat`` must close the backend's HTTP stream, which stops generation.
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


def public_url(url: str) -> str:
    """Scheme, host and port of ``url``: no user, password, path or query (they may hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"
