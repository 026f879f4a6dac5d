"""A built-in backend that invents its answer at a set pace, and manages pretend models.

It serves the demo and the benchmarks: time to first token and inter-token delay are fixed, so
whatever corral adds on top of them can be measured. It also plays the model lifecycle the way
Ollama does (a pull that reports layers downloading over a short time, load and unload with a
keep_alive, delete), so the demo can show pull / warm / unload / rm without an Ollama.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from broker.durations import keep_alive_seconds
from broker.errors import ModelNotFound, ModelOpError
from broker.schemas import (
    Capability,
    ChatMessage,
    GenerationOptions,
    ModelInfo,
    ToolCall,
    ToolDefinition,
)
from worker.backends.base import (
    KEEP_LOADED_FOREVER,
    AdapterIdentity,
    Chunk,
    Embeddings,
    PullProgress,
)

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("sim-small", "sim-large")

GB = 1_000_000_000

EMBEDDING_DIMENSIONS = 16


@dataclass(frozen=True, slots=True)
class SimulatedModel:
    """What the simulated backend says about one of its models."""

    name: str
    size_bytes: int
    family: str = "simllama"
    parameter_size: str = "1B"
    quantization: str = "Q4_K_M"
    context_length: int = 8192
    capabilities: frozenset[Capability] = frozenset({"chat"})

    @property
    def loaded_bytes(self) -> int:
        # What Ollama reports for a loaded model: the weights plus its KV cache and buffers.
        return self.size_bytes + self.size_bytes // 5


CATALOG: dict[str, SimulatedModel] = {
    m.name: m
    for m in (
        SimulatedModel("sim-small", int(1.3 * GB), capabilities=frozenset({"chat", "tools"})),
        SimulatedModel(
            "sim-large",
            int(4.9 * GB),
            parameter_size="8B",
            context_length=131072,
            capabilities=frozenset({"chat", "tools", "thinking"}),
        ),
        SimulatedModel(
            "sim-vision",
            int(2.8 * GB),
            parameter_size="4B",
            capabilities=frozenset({"chat", "vision"}),
        ),
        SimulatedModel(
            "sim-huge",
            int(39.6 * GB),
            parameter_size="70B",
            context_length=131072,
            capabilities=frozenset({"chat", "tools"}),
        ),
        SimulatedModel(
            "sim-embed",
            int(0.27 * GB),
            family="simbert",
            parameter_size="137M",
            quantization="F16",
            context_length=2048,
            capabilities=frozenset({"embed"}),
        ),
    )
}
"""The simulated registry: what ``pull`` can fetch, and the facts of the default models."""

_REPLIES = (
    "A home lab cluster routes each prompt to the node that already has the model loaded, "
    "so nothing swaps in and out of memory.",
    "Tokens stream back over Redis pub/sub as the backend produces them, and a replay log "
    "lets a late client catch up without missing one.",
    "Every node runs a small worker that fronts its local Ollama or llama.cpp server and "
    "reports its models and load every few seconds.",
    "When a node goes quiet for three heartbeats, its jobs move to the next node and the "
    "router stops sending it work until it comes back.",
)


def reply_for(messages: Sequence[ChatMessage]) -> str:
    """A deterministic answer chosen by the prompt, so repeated runs read the same."""
    prompt = messages[-1].content if messages else ""
    digest = hashlib.sha256(prompt.encode()).digest()
    return _REPLIES[digest[0] % len(_REPLIES)]


def simulated_embedding(text: str, dims: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector for ``text``: equal texts get equal vectors."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:dims]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def _describe(name: str) -> SimulatedModel:
    return CATALOG.get(name) or SimulatedModel(name, int(1.3 * GB))


class SimulatedBackend(AdapterIdentity):
    """Streams a canned answer word by word after ``first_token_s``, one word per ``token_s``.

    Its first model starts loaded; a chat loads the model it uses (for good, as with a
    ``keep_alive`` of -1). ``pull_s`` is how long a simulated download takes.
    """

    def __init__(
        self,
        name: str = "sim",
        *,
        first_token_s: float = 0.05,
        token_s: float = 0.02,
        models: Sequence[str] = DEFAULT_MODELS,
        capacity: int = 2,
        pull_s: float = 1.5,
        crash_on: str | None = None,
    ) -> None:
        super().__init__(name, "simulated", capacity=capacity)
        self._crash_on = crash_on
        self._first_token_s = first_token_s
        self._token_s = token_s
        self._models: dict[str, SimulatedModel] = {m: _describe(m) for m in models}
        # Loaded models and when they unload (None: never).
        self._loaded: dict[str, float | None] = {m: None for m in list(self._models)[:1]}
        self._pull_s = pull_s

    async def inventory(self) -> list[ModelInfo]:
        self._expire()
        return [self._info(model) for model in self._models.values()]

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        self._installed(model)
        self._loaded[model] = None
        if self._crash_on and messages and self._crash_on in messages[-1].content:
            # Chaos testing: a prompt that takes the whole worker down, as a segfaulting
            # runtime or the kernel's OOM killer would. No cleanup, no goodbye.
            log.critical("simulated crash: the prompt contains %r", self._crash_on)
            os.kill(os.getpid(), signal.SIGKILL)
        if tools and messages and messages[-1].role != "tool":
            # A simulated model with tools calls the first one (with no arguments), so a demo
            # or a client can see a tool call travel; images it takes as read.
            await asyncio.sleep(self._first_token_s)
            call = ToolCall(id=f"call_{len(messages)}", name=tools[0].function.name)
            yield Chunk(text="", tool_calls=(call,))
            yield Chunk(text="", done=True, finish_reason="tool_calls", completion_tokens=1)
            return
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

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        """A unit vector per text, the same every time for the same text."""
        self._installed(model)
        self._loaded[model] = None
        if self._crash_on and any(self._crash_on in text for text in inputs):
            log.critical("simulated crash: an input contains %r", self._crash_on)
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(self._first_token_s)
        vectors = [simulated_embedding(text) for text in inputs]
        return Embeddings(vectors, prompt_tokens=sum(len(text.split()) for text in inputs))

    # --- the model lifecycle -------------------------------------------------------------------

    async def pull(self, model: str) -> AsyncGenerator[PullProgress, None]:
        """Ollama's sequence of steps: the manifest, each layer's bytes, verify, success."""
        wanted = CATALOG.get(model)
        yield PullProgress(status="pulling manifest")
        if wanted is None:
            raise ModelNotFound(
                f"model {model!r} not found in the simulated registry "
                f"(it has {', '.join(sorted(CATALOG))})"
            )
        for digest, size in _layers(wanted):
            status = f"pulling {digest[:12]}"
            # The weights take most of the time, in steps; the small layers arrive at once.
            steps = 10 if size > 1_000_000 else 1
            for step in range(1, steps + 1):
                if steps > 1:
                    await asyncio.sleep(self._pull_s * 0.8 / steps)
                completed = size * step // steps
                yield PullProgress(status, f"sha256:{digest}", total=size, completed=completed)
        await asyncio.sleep(self._pull_s * 0.2)
        yield PullProgress(status="verifying sha256 digest")
        self._models[wanted.name] = wanted
        yield PullProgress(status="writing manifest")
        yield PullProgress(status="success")

    async def load(self, model: str, keep_alive: str | None = None) -> None:
        self._installed(model)
        try:
            seconds = keep_alive_seconds(keep_alive or KEEP_LOADED_FOREVER)
        except ValueError as exc:
            raise ModelOpError(str(exc)) from None
        if seconds == 0:
            self._loaded.pop(model, None)
            return
        await asyncio.sleep(self._first_token_s)  # loading takes a moment, like the real thing
        self._loaded[model] = None if seconds is None else time.time() + seconds

    async def unload(self, model: str) -> None:
        self._installed(model)
        self._loaded.pop(model, None)

    async def delete(self, model: str) -> None:
        self._installed(model)
        del self._models[model]
        self._loaded.pop(model, None)

    # --- internals -------------------------------------------------------------------------

    def _installed(self, model: str) -> SimulatedModel:
        found = self._models.get(model)
        if found is None:
            raise ModelNotFound(f"model {model!r} not found on backend {self._name!r}")
        return found

    def _expire(self) -> None:
        now = time.time()
        for model, until in list(self._loaded.items()):
            if until is not None and until <= now:
                del self._loaded[model]

    def _info(self, model: SimulatedModel) -> ModelInfo:
        loaded = model.name in self._loaded
        return ModelInfo(
            name=model.name,
            loaded=loaded,
            size_bytes=model.size_bytes,
            family=model.family,
            parameter_size=model.parameter_size,
            quantization=model.quantization,
            context_length=model.context_length,
            capabilities=model.capabilities,
            loaded_until=self._loaded.get(model.name) if loaded else None,
            loaded_bytes=model.loaded_bytes if loaded else None,
            loaded_vram_bytes=0 if loaded else None,
        )


def _layers(model: SimulatedModel) -> list[tuple[str, int]]:
    """The weights, then the small template / license / params layers, with stable digests."""
    small = (("template", 1_482), ("license", 12_403), ("params", 96))
    weights = model.size_bytes - sum(size for _, size in small)
    return [
        (hashlib.sha256(f"{model.name}/{part}".encode()).hexdigest(), size)
        for part, size in (("weights", weights), *small)
    ]
