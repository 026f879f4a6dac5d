"""What the router asks of a fleet, answered without scanning every model of every node.

A ``NodeIndex`` is built once per cluster view (every ``route_cache_s``) and read by every routing
decision made with that view: model -> the backends that hold it, tag -> the nodes that offer
it. A decision then costs what the nodes able to serve the job cost, not nodes x models.

It is still plain data (no I/O): the router stays a pure function, and a list of ``NodeState``
is turned into an index by ``NodeIndex(nodes)``. An index is also the node sequence it was
built from, so code that only iterates nodes needs no change.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, overload

from broker.schemas import ModelInfo, canonical_model_name

if TYPE_CHECKING:
    from controller.router import NodeState


@dataclass(frozen=True, slots=True)
class BackendOffer:
    """One backend of a node, with its models looked up the way the router needs them."""

    position: int
    """Where the backend is in its node's ``backends`` (its load is read from there)."""
    name: str
    target: str
    """``node/backend``: how a backend breaker names it."""
    by_canonical: Mapping[str, ModelInfo]
    """Canonical name -> model; of two spellings of one model the last wins, as in a scan."""
    default_pick: ModelInfo | None
    """The model a job naming no model and needing no model capability gets: the first loaded
    chat model (no swap), else the first chat model."""


@dataclass(frozen=True, slots=True)
class NodeEntry:
    name: str
    offers: tuple[BackendOffer, ...]
    provides: frozenset[str]
    """Tags the node can meet with some chat model: its own, plus its chat models' capabilities."""


@dataclass(frozen=True, slots=True)
class ModelHolder:
    """One backend that holds a model (``model`` is that backend's own spelling of it)."""

    node: str
    offer: BackendOffer
    model: ModelInfo


def _default_pick(models: Iterable[ModelInfo]) -> ModelInfo | None:
    first: ModelInfo | None = None
    for model in models:
        if not model.serves_chat():
            continue
        if model.loaded:
            return model
        if first is None:
            first = model
    return first


def _entry(state: NodeState) -> NodeEntry:
    info = state.info
    offers: list[BackendOffer] = []
    provides = set(info.tags)
    for backend in info.backends:
        by_canonical = {canonical_model_name(m.name): m for m in backend.models}
        for model in backend.models:
            if model.serves_chat():
                provides |= model.capabilities
        offers.append(
            BackendOffer(
                position=len(offers),
                name=backend.name,
                target=f"{info.name}/{backend.name}",
                by_canonical=by_canonical,
                default_pick=_default_pick(backend.models),
            )
        )
    # "chat" is every chat model's capability: as a tag it would match every node.
    provides.discard("chat")
    return NodeEntry(name=info.name, offers=tuple(offers), provides=frozenset(provides))


class NodeIndex(Sequence["NodeState"]):
    """The nodes of one cluster view, indexed by model and by tag.

    The inventory (models, tags) is indexed once; the load of a node (its queue, in-flight jobs)
    is read from its current ``NodeState`` at decision time, so ``with_queued`` can count jobs
    sent since the view was read without rebuilding anything.
    """

    __slots__ = ("_by_model", "_by_tag", "_entries", "_nodes", "_states")

    def __init__(self, nodes: Iterable[NodeState], *, previous: NodeIndex | None = None) -> None:
        self._nodes: list[NodeState] | None = list(nodes)
        self._states: dict[str, NodeState] = {s.name: s for s in self._nodes}
        self._entries: dict[str, NodeEntry] = {}
        self._by_model: dict[str, list[ModelHolder]] = {}
        self._by_tag: dict[str, set[str]] = {}
        for state in self._nodes:
            entry = _reused_entry(previous, state) or _entry(state)
            self._entries[state.name] = entry
            for offer in entry.offers:
                for canonical, model in offer.by_canonical.items():
                    holders = self._by_model.setdefault(canonical, [])
                    holders.append(ModelHolder(state.name, offer, model))
            for tag in entry.provides:
                self._by_tag.setdefault(tag, set()).add(state.name)

    # --- a sequence of NodeState ------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> NodeState: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[NodeState]: ...
    def __getitem__(self, index: int | slice) -> NodeState | Sequence[NodeState]:
        return self._node_list()[index]

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[NodeState]:
        return iter(self._node_list())

    def _node_list(self) -> list[NodeState]:
        if self._nodes is None:
            self._nodes = list(self._states.values())
        return self._nodes

    # --- what the router asks ---------------------------------------------------------------

    def state(self, name: str) -> NodeState | None:
        return self._states.get(name)

    def entry(self, name: str) -> NodeEntry | None:
        return self._entries.get(name)

    def holders(self, model_name: str) -> Sequence[ModelHolder]:
        """Every backend holding ``model_name`` (any spelling of it), in node order."""
        return self._by_model.get(canonical_model_name(model_name), ())

    def nodes_offering(self, tags: frozenset[str]) -> Iterable[str]:
        """Names of the nodes that could meet every one of ``tags`` (a superset of the nodes
        that can: one model must meet them together, which the router checks)."""
        if not tags:
            return self._states.keys()
        smallest, *others = sorted((self._by_tag.get(t, set()) for t in tags), key=len)
        return [name for name in smallest if all(name in s for s in others)]

    def with_queued(self, extra: Mapping[str, int]) -> NodeIndex:
        """This view with ``extra[name]`` more jobs waiting on those nodes (jobs this client
        sent since the view was read), sharing the index."""
        if not extra:
            return self
        copy = NodeIndex.__new__(NodeIndex)
        copy._entries, copy._by_model, copy._by_tag = self._entries, self._by_model, self._by_tag
        copy._states = dict(self._states)
        for name, count in extra.items():
            state = copy._states.get(name)
            if state is not None and count:
                copy._states[name] = replace(state, queued=state.queued + count)
        copy._nodes = None
        return copy


def _reused_entry(previous: NodeIndex | None, state: NodeState) -> NodeEntry | None:
    """The previous view's entry for this node when its inventory is the same objects (the
    cluster reader keeps an unchanged inventory's parsed models), else None."""
    if previous is None:
        return None
    old_entry = previous.entry(state.name)
    old_state = previous.state(state.name)
    if old_entry is None or old_state is None:
        return None
    old, new = old_state.info, state.info
    if old.tags != new.tags or len(old.backends) != len(new.backends):
        return None
    for old_backend, backend in zip(old.backends, new.backends, strict=True):
        if old_backend.models is not backend.models or old_backend.name != backend.name:
            return None
    return old_entry
