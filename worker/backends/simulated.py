"""A built-in backend that invents its answer at a set pace.

It serves the demo and the benchmarks: time to first token and inter-token delay are fixed, so
whatever corral adds on top of them can be measured.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

from broker.errors import ModelNotFound
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from worker.backends.base import BackendKind, Chunk

DEFAULT_MODELS = ("sim-small", "sim-large")

_REPLIES = (
    "A home lab cluster routes each prompt to the node that already has the model loaded, "
    "so nothing swaps in and out of memory.",
    "Tokens stream back over Redis pub/sub as the backend produces them, and a replay log "
    "lets a late client catch up without missing one.",
    "Every node runs a small worker that fronts its local Ollama or llama.cpp server and "
    "reports its models and load every few seconds.",
    "When a node goes quiet for three heartbeats the router stops sending it work until "
    "it comes back.",
)


def reply_for(messages: Sequence[ChatMessage]) -> str:
    """A deterministic answer chosen by the prompt, so repeated runs read the same."""
    prompt = messages[-1].content if messages else ""
    digest = hashlib.sha256(prompt.encode()).digest()
    return _REPLIES[digest[0] % len(_REPLIES)]


class SimulatedBackend:
    """Streams a canned answer word by word after ``first_token_s``, one word per ``token_s``."""

    def __init__(
        self,
        name: str = "sim",
        *,
        first_token_s: float = 0.05,
        token_s: float = 0.02,
        models: Sequence[str] = DEFAULT_MODELS,
        capacity: int = 2,
    ) -> None:
        self._name = name
        self._first_token_s = first_token_s
        self._token_s = token_s
        self._models = tuple(models)
        self._loaded: set[str] = {self._models[0]} if self._models else set()
        self._capacity = capacity

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> BackendKind:
        return "simulated"

    @property
    def url(self) -> str | None:
        return None

    @property
    def capacity(self) -> int:
        return self._capacity

    async def inventory(self) -> list[ModelInfo]:
        return [ModelInfo(name=m, loaded=m in self._loaded) for m in self._models]

    async def stream_chat(
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        if model not in self._models:
            raise ModelNotFound(f"model {model!r} not found on backend {self._name!r}")
        self._loaded.add(model)
        words = reply_for(messages).split(" ")
        if options.max_tokens is not None:
            words = words[: options.max_tokens]
        await asyncio.sleep(self._first_token_s)
        for index, word in enumerate(words):
            if index:
                await asyncio.sleep(self._token_s)
            yield Chunk(text=word if index == 0 else f" {word}")
        finish = (
            "length"
            if options.max_tokens is not None and len(words) >= options.max_tokens
            else "stop"
        )
        yield Chunk(
            text="",
            done=True,
            finish_reason=finish,
            prompt_tokens=sum(len(m.content.split()) for m in messages),
            completion_tokens=len(words),
        )

    async def aclose(self) -> None:
        return None
