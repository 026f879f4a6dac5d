"""What each model can do and what it costs: the capability and price tables.

Both ship as data files (``broker/data/capabilities.json``, ``broker/data/prices.json``), keyed
by provider (anthropic, openai, gemini, mistral, deepseek, and local for Ollama, llama.cpp and
the simulated backend) and model-name glob; within a provider the first glob that matches wins,
so specific patterns come before general ones. A capability row says: context (tokens in + out,
the trained length for local models), max_output, tools, vision, thinking (a reasoning control
that ``--effort`` maps onto), json (a JSON output mode); a price row: input and output, USD per
million tokens, list prices without caching or batch discounts (local models are not priced).
A provider's last, general glob catches a family newer than the table (``gemini-*``: function
calling and images, as every Gemini model has had since 1.5; its context comes from the API).
corral.yaml's ``capabilities:`` and ``prices:`` sections override or extend them in the same
shape.

The shipped tables are JSON, not YAML, so reading them needs no YAML parser (about 0.5 MB of a
worker's memory; PyYAML is imported only for a corral.yaml). Each table is read on the first
lookup that needs it, never at import nor when a catalog is made: a node whose backends report
every fact about their models (Ollama's /api/show) reads neither until a job asks for a price
or an effort mapping. Configured rows are checked when the catalog is made, so a mistake in
corral.yaml still stops the process at start-up.

The worker fills a model's gaps in its heartbeat from the capability table (context window,
vision, tools, thinking) and prices its jobs' tokens; the controller's router then reads the
filled ``ModelInfo``; ``corral route caps`` shows a row of each table.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import ConfigError
from broker.schemas import Capability, ModelInfo, Usage

__all__ = [
    "Catalog",
    "ModelCaps",
    "Price",
    "build_catalog",
    "catalog_for",
    "provider_of",
    "shipped_catalog",
]

_PROVIDER_OF_KIND = {
    "anthropic": "anthropic",
    "openai-cloud": "openai",
    "google": "gemini",
    "mistral": "mistral",
    "deepseek": "deepseek",
}
"""Backend kind -> the tables' provider name; every other kind is a local server."""

PROVIDERS = frozenset({*_PROVIDER_OF_KIND.values(), "local"})


def provider_of(kind: str) -> str:
    """The tables' provider for a backend kind: ``openai-cloud`` is openai, ``google`` gemini;
    Ollama, llama.cpp and the simulated backend are ``local``."""
    return _PROVIDER_OF_KIND.get(kind, "local")


class ModelCaps(BaseModel):
    """One row of the capability table. None: the table does not say."""

    # Built on first use, as the tables are read: most processes never validate a row.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    context: int | None = Field(default=None, ge=1)
    """Tokens the model reads and writes in one exchange (prompt plus answer)."""
    max_output: int | None = Field(default=None, ge=1)
    tools: bool | None = None
    vision: bool | None = None
    thinking: bool | None = None
    """Whether the model has a reasoning control that ``--effort`` maps onto."""
    json_output: bool | None = Field(default=None, alias="json")

    def capabilities(self) -> frozenset[Capability]:
        """The ``ModelInfo`` capabilities this row grants (chat included)."""
        granted: set[Capability] = {"chat"}
        if self.tools:
            granted.add("tools")
        if self.vision:
            granted.add("vision")
        if self.thinking:
            granted.add("thinking")
        return frozenset(granted)


class Price(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)

    def cost(self, usage: Usage) -> float:
        """The estimated cost of ``usage`` in USD (an unknown prompt count costs nothing)."""
        prompt = usage.prompt_tokens or 0
        return (prompt * self.input + usage.completion_tokens * self.output) / 1_000_000


_Rows = tuple[tuple[str, str, dict[str, Any]], ...]
"""(provider, glob, fields) in file order."""


def _rows(data: object, source: str) -> _Rows:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of provider -> {{model glob: fields}}")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for provider, entries in data.items():
        if provider not in PROVIDERS:
            known = ", ".join(sorted(PROVIDERS))
            raise ConfigError(f"{source}: unknown provider {provider!r} (known: {known})")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {provider} must map model globs to fields")
        for glob, fields in entries.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{source}: {provider} {glob!r} must be a mapping of fields")
            rows.append((provider, str(glob), fields))
    return tuple(rows)


def _first(rows: tuple[tuple[str, str, Any], ...], provider: str, model: str) -> Any | None:
    # Globs match the model name with or without an Ollama tag or a provider's "models/".
    names = {model, model.removeprefix("models/"), model.split(":", 1)[0]}
    for row_provider, glob, value in rows:
        if row_provider == provider and any(fnmatch.fnmatchcase(n, glob) for n in names):
            return value
    return None


@dataclass(frozen=True, slots=True)
class Catalog:
    """The capability and price tables: configured rows, looked at first, then the shipped
    rows (read on the first lookup that reaches them)."""

    caps_overrides: tuple[tuple[str, str, ModelCaps], ...] = ()
    price_overrides: tuple[tuple[str, str, Price], ...] = ()

    def capabilities(self, kind: str, model: str) -> ModelCaps | None:
        """What the tables say about ``model`` on a backend of ``kind``; None if nothing.

        A configured row changes only the fields it sets, on top of the shipped row."""
        provider = provider_of(kind)
        shipped: ModelCaps | None = _first(_shipped_caps(), provider, model)
        override: ModelCaps | None = _first(self.caps_overrides, provider, model)
        if override is None:
            return shipped
        if shipped is None:
            return override
        return shipped.model_copy(update=override.model_dump(exclude_unset=True))

    def price(self, kind: str, model: str) -> Price | None:
        """The price of ``model`` on a backend of ``kind``; None for local or unknown models.

        A configured price replaces the whole row."""
        provider = provider_of(kind)
        found: Price | None = _first(self.price_overrides, provider, model)
        if found is None:
            found = _first(_shipped_prices(), provider, model)
        return found

    def cost(self, kind: str, model: str, usage: Usage) -> float | None:
        price = self.price(kind, model)
        return round(price.cost(usage), 8) if price is not None else None

    def fill(self, kind: str, model: ModelInfo) -> ModelInfo:
        """``model`` with what its backend left unsaid (context, capabilities) from the table."""
        if model.context_length is not None and model.capabilities:
            return model  # nothing to fill: the table is not read (an idle Ollama node's case)
        caps = self.capabilities(kind, model.name)
        if caps is None:
            return model
        update: dict[str, Any] = {}
        if model.context_length is None and caps.context is not None:
            update["context_length"] = caps.context
        if not model.capabilities:  # empty: the backend said nothing, so a chat model
            update["capabilities"] = caps.capabilities()
        return model.model_copy(update=update) if update else model


def _caps_rows(rows: _Rows, source: str) -> tuple[tuple[str, str, ModelCaps], ...]:
    try:
        return tuple((p, g, ModelCaps.model_validate(f)) for p, g, f in rows)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc.errors()[0]['msg']} in a capabilities entry") from None


def _price_rows(rows: _Rows, source: str) -> tuple[tuple[str, str, Price], ...]:
    try:
        return tuple((p, g, Price.model_validate(f)) for p, g, f in rows)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc.errors()[0]['msg']} in a prices entry") from None


def _read_table(name: str) -> object:
    return json.loads(resources.files("broker").joinpath("data", name).read_text())


@cache
def _shipped_caps() -> tuple[tuple[str, str, ModelCaps], ...]:
    return _caps_rows(_rows(_read_table("capabilities.json"), "capabilities.json"), "shipped")


@cache
def _shipped_prices() -> tuple[tuple[str, str, Price], ...]:
    return _price_rows(_rows(_read_table("prices.json"), "prices.json"), "shipped")


_SHIPPED = Catalog()


def shipped_catalog() -> Catalog:
    """The tables as shipped (each read once per process, on its first lookup)."""
    return _SHIPPED


def build_catalog(capabilities: object = None, prices: object = None) -> Catalog:
    """The shipped tables with corral.yaml's ``capabilities:`` and ``prices:`` on top.

    Raises ConfigError naming the section for a malformed entry."""
    if capabilities is None and prices is None:
        return _SHIPPED
    section = "corral.yaml capabilities"
    caps_overrides = _caps_rows(_rows(capabilities, section), section)
    section = "corral.yaml prices"
    price_overrides = _price_rows(_rows(prices, section), section)
    return Catalog(caps_overrides=caps_overrides, price_overrides=price_overrides)


def catalog_for(capabilities: object, prices: object) -> Catalog:
    """The catalog a process uses: the shipped one unless its settings configure rows."""
    if not capabilities and not prices:
        return _SHIPPED
    return build_catalog(capabilities or None, prices or None)
