"""Every model the cluster can serve now, from the nodes' last heartbeats."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.errors import CorralError
from broker.schemas import ModelInfo, canonical_model_name
from controller.gateway.errors import http_error
from controller.gateway.service import Gateway


@dataclass
class CatalogEntry:
    name: str
    nodes: list[str] = field(default_factory=list)
    loaded_on: list[str] = field(default_factory=list)
    alias_of: list[str] | None = None
    info: ModelInfo | None = None
    """The model as one of its nodes describes it (size, family, context length)."""


async def catalog(gateway: Gateway) -> list[CatalogEntry]:
    """Chat and embedding models on up nodes with a healthy backend, then the aliases that
    resolve to one."""
    try:
        states = await gateway.client.nodes(max_age_s=gateway.settings.route_cache_s)
    except CorralError as exc:
        raise http_error(exc) from None
    entries: dict[str, CatalogEntry] = {}
    for state in states:
        if not state.up:
            continue
        for backend in state.info.backends:
            if not backend.healthy:
                continue
            for model in backend.models:
                if not (model.serves_chat() or model.serves_embed()):
                    continue
                entry = entries.setdefault(model.name, CatalogEntry(model.name, info=model))
                if state.name not in entry.nodes:
                    entry.nodes.append(state.name)
                if model.loaded and state.name not in entry.loaded_on:
                    entry.loaded_on.append(state.name)
                if entry.info is not None and entry.info.context_length is None:
                    entry.info = model
    by_canonical = {canonical_model_name(name): e for name, e in entries.items()}
    models = sorted(entries.values(), key=lambda e: e.name)
    aliases = []
    for alias, targets in sorted(gateway.settings.aliases.items()):
        served = [
            by_canonical[canonical_model_name(t)]
            for t in targets
            if canonical_model_name(t) in by_canonical
        ]
        if served:
            nodes = sorted({n for e in served for n in e.nodes})
            loaded = sorted({n for e in served for n in e.loaded_on})
            aliases.append(CatalogEntry(alias, nodes, loaded, list(targets), served[0].info))
    return models + aliases


def find(entries: list[CatalogEntry], name: str) -> CatalogEntry | None:
    """``name`` and ``name:latest`` are one model."""
    wanted = canonical_model_name(name)
    for entry in entries:
        if entry.name == name or canonical_model_name(entry.name) == wanted:
            return entry
    return None
