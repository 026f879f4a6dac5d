"""What the router asks of a fleet, answered without scanning every model of every node.

A ``NodeIndex`` is built once per cluster view (every ``route_cache_s``) and read by every routing
decision made with that view: model -> the backends that hold it, tag -> the nodes that offer
it. A decision then costs what the nodes able to serve the job cost, not nodes x models.

It is still plain data (no I/O): the router stays a pure function, and a list of ``NodeState``
is turned into an index by ``NodeIndex(nodes)``. An index is also the node sequence it was
built from, so code that only iterates nodes needs no change.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple, overload

from broker.schemas import ModelInfo, canonical_model_name

if TYPE_CHECKING:
    from controller.router import Candidate, NodeState


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
    tags: frozenset[str]
    """The node's own tags."""
    offers: tuple[BackendOffer, ...]
    provides: frozenset[str]
    """Tags the node can meet with some chat model: its own, plus its chat models' capabilities."""


class ModelHolder(NamedTuple):
    """One backend that holds a model (``model`` is that backend's own spelling of it), with
    what the router asks of it worked out once per inventory rather than once per job."""

    node: str
    offer: BackendOffer
    model: ModelInfo
    chats: bool
    """The model serves chat jobs (the only kind the router places)."""
    provides: frozenset[str]
    """The tags a job on this model meets: the node's own and the model's capabilities."""


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
    capabilities: set[str] = set()
    for backend in info.backends:
        by_canonical = {canonical_model_name(m.name): m for m in backend.models}
        for model in backend.models:
            if model.serves_chat():
                capabilities |= model.capabilities
        offers.append(
            BackendOffer(
                position=len(offers),
                name=backend.name,
                target=f"{info.name}/{backend.name}",
                by_canonical=by_canonical,
                default_pick=_default_pick(backend.models),
            )
        )
    # "chat" is every chat model's capability: as a tag it would match every node (but a node
    # may carry it as its own tag).
    capabilities.discard("chat")
    return NodeEntry(
        name=info.name, tags=info.tags, offers=tuple(offers), provides=info.tags | capabilities
    )


RankingQuery = tuple[Literal["model"], str] | tuple[Literal["tags"], frozenset[str]]
"""What a cached ranking answers: a model (canonical name), or chat jobs needing these tags."""

RankKey = tuple[bool, int, int, bool, int, float, int, str, str]


class Ranked(NamedTuple):
    """A candidate with its sort key, its backend's breaker target, and the tags it meets."""

    key: RankKey
    candidate: Candidate
    node: str
    target: str
    provides: frozenset[str]


class NodeIndex(Sequence["NodeState"]):
    """The nodes of one cluster view, indexed by model and by tag.

    The inventory (models, tags) is indexed when the view is made, reusing the previous view's
    work for every node whose inventory did not change. A routing query's full ranking is kept
    the first time it is asked, so later jobs of the same view only apply their own filters.
    ``with_queued`` counts jobs sent since the view was read without rebuilding anything: the
    nodes it changes are ranked again on their own (``requeued``).
    """

    __slots__ = (
        "_base",
        "_by_model",
        "_by_tag",
        "_carried",
        "_entries",
        "_nodes",
        "_rankings",
        "_states",
    )

    def __init__(self, nodes: Iterable[NodeState], *, previous: NodeIndex | None = None) -> None:
        self._nodes: list[NodeState] | None = list(nodes)
        self._base: dict[str, NodeState] = {s.name: s for s in self._nodes}
        self._states: dict[str, NodeState] = {}
        """States that differ from ``_base`` (jobs sent since the view was read)."""
        self._rankings: dict[RankingQuery, list[Ranked]] = {}
        self._entries: dict[str, NodeEntry] = {}
        changed: list[str] = []
        for state in self._nodes:
            entry = _reused_entry(previous, state)
            if entry is None:
                entry = _entry(state)
                changed.append(state.name)
            self._entries[state.name] = entry
        self._carried: tuple[dict[RankingQuery, list[Ranked]], frozenset[str]] | None = None
        if previous is None:
            self._by_model: ModelMap = {}
            self._by_tag: dict[str, frozenset[str]] = {}
            _add_entries(self._by_model, self._by_tag, self._entries.values())
        else:
            gone = [n for n in previous._entries if n not in self._entries]
            self._by_model, self._by_tag = _updated(previous, [*changed, *gone], self._entries)
            self._carried = _carried_rankings(previous, self._base, [*changed, *gone])

    # --- a sequence of NodeState ------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> NodeState: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[NodeState]: ...
    def __getitem__(self, index: int | slice) -> NodeState | Sequence[NodeState]:
        return self._node_list()[index]

    def __len__(self) -> int:
        return len(self._base)

    def __iter__(self) -> Iterator[NodeState]:
        return iter(self._node_list())

    def _node_list(self) -> list[NodeState]:
        if self._nodes is None:
            self._nodes = [self._states.get(n, s) for n, s in self._base.items()]
        return self._nodes

    # --- what the router asks ---------------------------------------------------------------

    def state(self, name: str) -> NodeState | None:
        return self._states.get(name) or self._base.get(name)

    def base_state(self, name: str) -> NodeState | None:
        """The node as the view was read (before ``with_queued``)."""
        return self._base.get(name)

    @property
    def requeued(self) -> Collection[str]:
        """Nodes whose state ``with_queued`` changed: cached rankings are stale for them."""
        return self._states.keys()

    def entry(self, name: str) -> NodeEntry | None:
        return self._entries.get(name)

    def holders(self, model_name: str) -> Sequence[ModelHolder]:
        """Every backend holding ``model_name`` (any spelling of it)."""
        on_nodes = self._by_model.get(canonical_model_name(model_name))
        if on_nodes is None:
            return ()
        return [holder for holders in on_nodes.values() for holder in holders]

    def nodes_offering(self, tags: frozenset[str]) -> Iterable[str]:
        """Names of the nodes that could meet every one of ``tags`` (a superset of the nodes
        that can: one model must meet them together, which the router checks)."""
        if not tags:
            return self._base.keys()
        smallest, *others = sorted((self._by_tag.get(t, frozenset()) for t in tags), key=len)
        return [name for name in smallest if all(name in s for s in others)]

    def ranking(
        self, query: RankingQuery, build: Callable[[Collection[str] | None], list[Ranked]]
    ) -> list[Ranked]:
        """``query``'s ranking on this view, made the first time it is asked.

        ``build(None)`` ranks every node for it, ``build(names)`` only those (as this view has
        them before ``with_queued``). When the previous view ranked the same query, its ranking
        is reused with only the nodes that changed since (a new load, inventory, or liveness)
        ranked again. Shared with every ``with_queued`` copy (they differ only in ``requeued``
        nodes, which the router ranks again). Two threads may both make it; either answer is
        the same.
        """
        found = self._rankings.get(query)
        if found is not None:
            return found
        carried = self._carried[0].get(query) if self._carried is not None else None
        if carried is None or self._carried is None:
            found = build(None)
        else:
            stale = self._carried[1]
            found = [r for r in carried if r.node not in stale]
            fresh = build({n for n in stale if n in self._base})
            if len(fresh) < _INSERT_ONE_BY_ONE:
                for ranked in fresh:
                    bisect.insort(found, ranked, key=_rank_key)
            else:
                found += fresh
                found.sort(key=_rank_key)
        self._rankings[query] = found
        return found

    def with_queued(self, extra: Mapping[str, int]) -> NodeIndex:
        """This view with ``extra[name]`` more jobs waiting on those nodes (jobs this client
        sent since the view was read), sharing the index and its rankings."""
        if not any(extra.values()):
            return self
        copy = NodeIndex.__new__(NodeIndex)
        copy._base, copy._entries = self._base, self._entries
        copy._by_model, copy._by_tag, copy._rankings = self._by_model, self._by_tag, self._rankings
        copy._carried = self._carried
        copy._states = dict(self._states)
        for name, count in extra.items():
            state = copy.state(name)
            if state is not None and count:
                copy._states[name] = replace(state, queued=state.queued + count)
        copy._nodes = None
        return copy


ModelMap = dict[str, dict[str, tuple[ModelHolder, ...]]]
"""Canonical model name -> node name -> that node's backends holding it."""


def _holders_by_model(entries: Iterable[NodeEntry]) -> dict[str, dict[str, list[ModelHolder]]]:
    models: dict[str, dict[str, list[ModelHolder]]] = {}
    for entry in entries:
        for offer in entry.offers:
            for canonical, model in offer.by_canonical.items():
                on_node = models.setdefault(canonical, {}).setdefault(entry.name, [])
                # "chat" is every chat model's capability: as a tag it would match every node.
                provides = entry.tags | (model.capabilities - {"chat"})
                on_node.append(ModelHolder(entry.name, offer, model, model.serves_chat(), provides))
    return models


def _nodes_by_tag(entries: Iterable[NodeEntry]) -> dict[str, set[str]]:
    tags: dict[str, set[str]] = {}
    for entry in entries:
        for tag in entry.provides:
            tags.setdefault(tag, set()).add(entry.name)
    return tags


def _add_entries(
    by_model: ModelMap, by_tag: dict[str, frozenset[str]], entries: Iterable[NodeEntry]
) -> None:
    """Build the maps of a first view."""
    entries = list(entries)
    for canonical, nodes in _holders_by_model(entries).items():
        by_model[canonical] = {name: tuple(holders) for name, holders in nodes.items()}
    for tag, names in _nodes_by_tag(entries).items():
        by_tag[tag] = frozenset(names)


def _updated(
    previous: NodeIndex, changed: list[str], entries: Mapping[str, NodeEntry]
) -> tuple[ModelMap, dict[str, frozenset[str]]]:
    """The previous view's model and tag maps with ``changed`` nodes taken out and put back
    from ``entries``: a view where few inventories changed costs what those nodes cost (the
    previous view's maps are shared, so a touched entry is copied, never changed)."""
    if not changed:
        return previous._by_model, previous._by_tag
    by_model = dict(previous._by_model)
    by_tag = dict(previous._by_tag)
    out = set(changed)
    touched_models: set[str] = set()
    touched_tags: set[str] = set()
    for name in changed:
        old = previous._entries.get(name)
        if old is not None:
            touched_models.update(c for o in old.offers for c in o.by_canonical)
            touched_tags.update(old.provides)
    new = [entries[n] for n in changed if n in entries]
    added_models = _holders_by_model(new)
    added_tags = _nodes_by_tag(new)
    for canonical in touched_models | added_models.keys():
        inner = dict(by_model.get(canonical, {}))  # a C-level copy, then a few removals
        for name in out:
            inner.pop(name, None)
        for name, holders in added_models.get(canonical, {}).items():
            inner[name] = tuple(holders)
        if inner:
            by_model[canonical] = inner
        else:
            by_model.pop(canonical, None)
    for tag in touched_tags | added_tags.keys():
        remaining = (by_tag.get(tag, frozenset()) - out) | added_tags.get(tag, set())
        if remaining:
            by_tag[tag] = remaining
        else:
            by_tag.pop(tag, None)
    return by_model, by_tag


_INSERT_ONE_BY_ONE = 32
# Above this share of changed nodes a ranking is made afresh rather than patched.
_CARRY_AT_MOST = 0.5


def _rank_key(ranked: Ranked) -> RankKey:
    return ranked.key


def _carried_rankings(
    previous: NodeIndex, base: Mapping[str, NodeState], changed: Iterable[str]
) -> tuple[dict[RankingQuery, list[Ranked]], frozenset[str]] | None:
    """The previous view's rankings and the nodes they are stale for: those whose inventory
    changed or that came or went, and those whose state is not the same object's (the
    cluster reader hands back the very NodeInfo when a node's load did not change)."""
    stale = set(changed)
    for name, state in base.items():
        old = previous._base.get(name)
        if old is None or not (
            old.info is state.info and old.up == state.up and old.queued == state.queued
        ):
            stale.add(name)
    # Nodes gone cost only their filtering; nodes present and changed are ranked again.
    if sum(1 for name in stale if name in base) > _CARRY_AT_MOST * len(base):
        return None
    return previous._rankings, frozenset(stale)


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
