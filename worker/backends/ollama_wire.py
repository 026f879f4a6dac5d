"""Ollama's wire format, as far as corral reads it, and the translations to corral's terms.

Only the fields corral uses are declared (Ollama adds fields over time; the rest is ignored).
Kept apart from the adapter so ``ollama.py`` reads as HTTP calls and this reads as the API
documentation: /api/tags, /api/ps, /api/show, /api/chat and /api/pull bodies, capabilities,
context length, ``expires_at`` and ``keep_alive``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from broker.durations import keep_alive_seconds
from broker.schemas import Capability, ChatMessage, GenerationOptions, ToolCall

FOREVER_AFTER_S = 100 * 365 * 24 * 3600.0
"""An ``expires_at`` further away than this means "never": for ``keep_alive: -1`` Ollama adds
the largest Go duration (about 292 years) to the current time."""

OLLAMA_CAPABILITIES: Mapping[str, Capability] = {
    "completion": "chat",
    "embedding": "embed",
    "vision": "vision",
    "tools": "tools",
    "thinking": "thinking",
    "insert": "insert",
}
"""``/api/show`` capability names (Ollama's types/model/capability.go) in corral's vocabulary."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Details(_Wire):
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class ListedModel(_Wire):
    """One entry of ``/api/tags`` (installed) or ``/api/ps`` (in memory, with the last three)."""

    name: str = ""
    model: str = ""
    size: int | None = None
    digest: str = ""
    details: Details = Field(default_factory=Details)
    expires_at: str | None = None
    size_vram: int | None = None

    @property
    def key(self) -> str:
        return self.name or self.model


class ModelList(_Wire):
    """The body of both ``/api/tags`` and ``/api/ps``."""

    models: list[ListedModel] | None = None


class ShowResponse(_Wire):
    """``/api/show``: ``capabilities`` since Ollama 0.6, ``model_info`` holds the GGUF metadata."""

    capabilities: list[str] | None = None
    model_info: dict[str, Any] | None = None


class WireFunctionCall(_Wire):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class WireToolCall(_Wire):
    """A call in Ollama's native shape: the arguments an object, an ``id`` only in newer
    versions."""

    id: str | None = None
    function: WireFunctionCall


class LineMessage(_Wire):
    content: str = ""
    thinking: str = ""
    tool_calls: list[WireToolCall] | None = None


class EmbedResponse(_Wire):
    """``POST /api/embed``: one vector per input, and the tokens the inputs took."""

    embeddings: list[list[float]]
    prompt_eval_count: int | None = None


class ChatLine(_Wire):
    """One NDJSON line of ``/api/chat``; the last has ``done`` and the counters."""

    message: LineMessage | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None


class PullLine(_Wire):
    """One NDJSON line of ``/api/pull``: a status, and for a layer its digest and byte counts."""

    status: str = ""
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    error: str | None = None


class ErrorBody(_Wire):
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What ``/api/show`` says about a model that ``/api/tags`` does not."""

    capabilities: frozenset[Capability] = frozenset()
    context_length: int | None = None


UNKNOWN_FACTS = ModelFacts()


def facts_from_show(show: ShowResponse) -> ModelFacts:
    return ModelFacts(
        capabilities=capabilities_from(show.capabilities or ()),
        context_length=context_length_from(show.model_info or {}),
    )


def capabilities_from(names: Iterable[str]) -> frozenset[Capability]:
    """corral's capabilities for Ollama's names; ones corral has no word for are left out."""
    return frozenset(OLLAMA_CAPABILITIES[name] for name in names if name in OLLAMA_CAPABILITIES)


def context_length_from(model_info: Mapping[str, Any]) -> int | None:
    """The trained context length: ``<architecture>.context_length`` in the GGUF metadata.

    The architecture's own key is preferred, since a vision model's metadata may also carry
    other ``*.context_length`` keys; any such key will do when the architecture is not named.
    """
    architecture = model_info.get("general.architecture")
    preferred = f"{architecture}.context_length" if isinstance(architecture, str) else ""
    candidates = [preferred] if preferred in model_info else []
    candidates += sorted(k for k in model_info if k.endswith(".context_length"))
    for key in candidates:
        value = model_info[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def loaded_until_from(expires_at: str | None, now: float) -> float | None:
    """Epoch seconds from ``/api/ps``'s RFC 3339 ``expires_at``; None for "kept forever" or
    a time that says nothing (missing, unreadable, or Go's zero time while a model loads)."""
    if not expires_at:
        return None
    try:
        moment = datetime.fromisoformat(expires_at).timestamp()
    except ValueError:
        return None
    if moment <= 0 or moment - now > FOREVER_AFTER_S:
        return None
    return moment


def ollama_keep_alive(keep_alive: str) -> int | float | str:
    """``keep_alive`` as Ollama's JSON wants it; raises ValueError if it is not a duration.

    Ollama reads a JSON number as seconds and a string as a Go duration, which needs a unit:
    the string "-1" is refused ("missing unit in duration"), so numbers travel as numbers.
    """
    keep_alive_seconds(keep_alive)
    text = keep_alive.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


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


def ollama_message(message: ChatMessage) -> dict[str, object]:
    """One chat message in ``/api/chat``'s shape: images as base64, calls as objects."""
    wire: dict[str, object] = {"role": message.role, "content": message.content}
    if message.images:
        wire["images"] = list(message.images)
    if message.tool_calls:
        wire["tool_calls"] = [
            {"function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.role == "tool" and message.name:
        wire["tool_name"] = message.name
    return wire


def tool_calls_from(message: LineMessage | None, new_id: Callable[[], str]) -> tuple[ToolCall, ...]:
    """corral's calls for a line's; Ollama before 0.12 gives no id, so one is made."""
    if message is None or not message.tool_calls:
        return ()
    return tuple(
        ToolCall(id=call.id or new_id(), name=call.function.name, arguments=call.function.arguments)
        for call in message.tool_calls
    )
