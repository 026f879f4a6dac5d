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

from broker.schemas import BackendInfo, ModelInfo, canonical_model_name
from broker.tiers import TIER_ORDER, tier_of_kind

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
    tier_rank: int
    """The backend's cost tier as the router sorts it (``TIER_ORDER``)."""


@dataclass(frozen=True, slots=True)
class NodeEntry:
    name: str
    tags: frozenset[str]
    """The node's own tags."""
    offers: tuple[BackendOffer, ...]
    provides: frozenset[str]
    """Tags the node can meet with some chat model: its own, plus its chat models' capabilities."""
    default_holders: tuple[ModelHolder | None, ...]
    """Per offer, its ``default_pick`` as a holder: what a job naming no model gets there."""


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
    target: str
    """``offer.target``, one attribute nearer: read for every holder of a first decision."""
    prefix: int
    """The inventory's part of the rank key: cost tier, then not loaded (see ``rank_prefix``)."""


def rank_prefix(offer: BackendOffer, model: ModelInfo) -> int:
    """The rank key's first part that a node's inventory fixes: cheaper tier first, then a
    model already loaded (no swap) before one that is not."""
    return offer.tier_rank * 2 + (0 if model.loaded else 1)


def model_holder(
    node: str, tags: frozenset[str], offer: BackendOffer, model: ModelInfo
) -> ModelHolder:
    """``model`` on ``offer`` of the node ``node`` whose own tags are ``tags``."""
    # "chat" is every chat model's capability: as a tag it would match every node.
    provides = tags | (model.capabilities - {"chat"})
    return ModelHolder(
        node,
        offer,
        model,
        model.serves_chat(),
        provides,
        offer.target,
        rank_prefix(offer, model),
    )


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
                tier_rank=TIER_ORDER.get(tier_of_kind(backend.kind), 0),
            )
        )
    # "chat" is every chat model's capability: as a tag it would match every node (but a node
    # may carry it as its own tag).
    capabilities.discard("chat")
    return NodeEntry(
        name=info.name,
        tags=info.tags,
        offers=tuple(offers),
        provides=info.tags | capabilities,
        default_holders=tuple(
            None
            if o.default_pick is None
            else model_holder(info.name, info.tags, o, o.default_pick)
            for o in offers
        ),
    )


RankingQuery = tuple[Literal["model"], str] | tuple[Literal["tags"], frozenset[str]]
"""What a cached ranking answers: a model (canonical name), or chat jobs needing these tags."""

OfferKey = tuple[int, float, int, str, str, str]
"""The per-node part of the rank key, for one backend: most spare first, then lowest latency,
fewest jobs, node name, backend name (and the ``node/backend`` target, which names both)."""


class HolderGroup(NamedTuple):
    """Every holder a query could be served by, as far as the inventory says (a chat model;
    tags met), by the inventory's part of the rank key: kept while no inventory it names
    changes, across views."""

    buckets: tuple[tuple[int, frozenset[str]], ...]
    """(prefix, the ``node/backend`` targets with it), best prefix first."""
    by_target: Mapping[str, ModelHolder]


class QueryRanking(NamedTuple):
    """A query's holders on one view as read."""

    group: HolderGroup
    sorted_buckets: list[list[str] | None]
    """Each bucket's targets by their slot in this view, once a decision read past its best
    (``controller.ranking.in_rank_order``); None until then."""
    bests: list[str | None]
    """Each bucket's best target in this view once looked for ("": none can take jobs)."""


def holder_group(
    holders: Iterable[ModelHolder],
    previous: HolderGroup | None = None,
    out: frozenset[str] = frozenset(),
) -> HolderGroup:
    """``holders`` (those serving chat) grouped for ranking (one per backend); added to
    ``previous`` without its holders on the ``out`` targets, when given (set operations in C:
    a view where a node's inventory changed patches each of its models' groups)."""
    by_prefix: dict[int, frozenset[str]] = {}
    by_target: dict[str, ModelHolder] = {}
    if previous is not None:
        # ``isdisjoint`` walks the smaller set: most buckets keep their very frozenset.
        by_prefix = {
            p: targets if targets.isdisjoint(out) else targets - out
            for p, targets in previous.buckets
        }
        by_target = dict(previous.by_target)
        for target in out if len(out) < len(by_target) else by_target.keys() & out:
            by_target.pop(target, None)
    added: dict[int, list[str]] = {}
    for holder in holders:
        if holder.chats:
            added.setdefault(holder.prefix, []).append(holder.target)
            by_target[holder.target] = holder
    for prefix, targets in added.items():
        by_prefix[prefix] = by_prefix.get(prefix, frozenset()).union(targets)
    buckets = tuple((p, by_prefix[p]) for p in sorted(by_prefix) if by_prefix[p])
    return HolderGroup(buckets, by_target)


EMPTY_GROUP = HolderGroup((), {})


class ModelHolders:
    """A model's holders, by node, and grouped for ranking when first asked (``group``).

    Grouping every model a changed inventory touches as the view is built would copy each
    one's group (a hundred objects at 1,000 nodes, each a cache miss): a view keeps instead
    what changed (``patch``), and the first job asking for the model applies it to the
    previous view's group, or groups the holders afresh when that one was never made.
    """

    __slots__ = ("_group", "_patch", "on_nodes")

    def __init__(
        self,
        on_nodes: Mapping[str, tuple[ModelHolder, ...]],
        patch: tuple[HolderGroup | None, frozenset[str], tuple[ModelHolder, ...]] | None = None,
    ) -> None:
        self.on_nodes = on_nodes
        """Node name -> that node's backends holding the model."""
        self._patch = patch
        """(the previous view's group, targets out since, holders added since)."""
        self._group: HolderGroup | None = None

    @property
    def group(self) -> HolderGroup:
        found = self._group
        if found is None:
            base, out, added = self._patch or (None, frozenset(), ())
            if base is None:
                found = holder_group(h for holders in self.on_nodes.values() for h in holders)
            else:
                found = holder_group(added, base, out)
            # Two threads may both make it: either answer is the same.
            self._group, self._patch = found, None
        return found

    @property
    def made_group(self) -> HolderGroup | None:
        """The group if a job asked for it (or it was patched from one), else None."""
        return self._group


class NodeIndex(Sequence["NodeState"]):
    """The nodes of one cluster view, indexed by model and by tag.

    The inventory (models, tags) is indexed when the view is made, reusing the previous view's
    work for every node whose inventory did not change. The part of the rank key that a node's
    load fixes (spare capacity, latency, jobs, names) is ranked once per view over every
    backend (``slots``), so a decision ranks a holder by two small ints. A routing query's
    packed ranking is kept the first time it is asked, so later jobs of the same view only
    apply their own filters. ``with_queued`` counts jobs sent since the view was read without
    rebuilding anything: the nodes it changes are ranked again on their own (``requeued``).
    """

    __slots__ = (
        "_base",
        "_by_model",
        "_by_tag",
        "_entries",
        "_groups",
        "_nodes",
        "_offer_keys",
        "_order",
        "_rankings",
        "_slots",
        "_states",
    )

    def __init__(self, nodes: Iterable[NodeState], *, previous: NodeIndex | None = None) -> None:
        self._nodes: list[NodeState] | None = list(nodes)
        self._base: dict[str, NodeState] = {s.name: s for s in self._nodes}
        self._states: dict[str, NodeState] = {}
        """States that differ from ``_base`` (jobs sent since the view was read)."""
        self._rankings: dict[RankingQuery, QueryRanking] = {}
        self._entries: dict[str, NodeEntry] = {}
        changed: list[str] = []
        for state in self._nodes:
            entry = _reused_entry(previous, state)
            if entry is None:
                entry = _entry(state)
                changed.append(state.name)
            self._entries[state.name] = entry
        self._groups: dict[frozenset[str], HolderGroup] = {}
        """Tags queries' holder groups (a model's are in ``_by_model``)."""
        if previous is None:
            self._by_model: ModelMap = {}
            self._by_tag: dict[str, frozenset[str]] = {}
            _add_entries(self._by_model, self._by_tag, self._entries.values())
        else:
            gone = [n for n in previous._entries if n not in self._entries]
            self._by_model, self._by_tag = _updated(previous, [*changed, *gone], self._entries)
            self._groups = _kept_groups(previous, [*changed, *gone], self._entries)
        self._offer_keys, self._order, self._slots = _ranked_offers(
            self._base.values(), self._entries
        )

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

    @property
    def requeued(self) -> Collection[str]:
        """Nodes whose state ``with_queued`` changed: cached rankings are stale for them."""
        return self._states.keys()

    def entry(self, name: str) -> NodeEntry | None:
        return self._entries.get(name)

    def holders(self, model_name: str) -> Sequence[ModelHolder]:
        """Every backend holding ``model_name`` (any spelling of it)."""
        found = self._by_model.get(canonical_model_name(model_name))
        if found is None:
            return ()
        return [holder for holders in found.on_nodes.values() for holder in holders]

    def nodes_offering(self, tags: frozenset[str]) -> Iterable[str]:
        """Names of the nodes that could meet every one of ``tags`` (a superset of the nodes
        that can: one model must meet them together, which the router checks)."""
        if not tags:
            return self._base.keys()
        smallest, *others = sorted((self._by_tag.get(t, frozenset()) for t in tags), key=len)
        return [name for name in smallest if all(name in s for s in others)]

    @property
    def slots(self) -> Mapping[str, int]:
        """``node/backend`` -> its place among every backend of the view as read, by the
        per-node part of the rank key (``OfferKey``): odd numbers, 1 for the best; ``span``
        for a backend that cannot take jobs (unhealthy, or its node down)."""
        return self._slots

    @property
    def in_slot_order(self) -> Sequence[str]:
        """The targets with a usable slot, best first."""
        return self._order

    @property
    def span(self) -> int:
        """One more than any usable slot, and than the number of backends (packed keys'
        base): the slot of a backend that cannot take jobs."""
        return 2 * len(self._offer_keys) + 2

    def requeued_slots(self) -> dict[str, int]:
        """Slots of the ``requeued`` nodes' backends with their jobs sent since: the even
        number just before the first backend of the view they now rank ahead of, so they fall
        between the others without renumbering them. In rank order (two may share a slot)."""
        placed: list[tuple[OfferKey, int]] = []
        for name, state in self._states.items():
            entry = self._entries.get(name)
            if entry is not None and state.up:
                for key in _offer_keys(state, entry):
                    placed.append((key, 2 * bisect.bisect_left(self._offer_keys, key)))
        placed.sort()
        return {key[5]: slot for key, slot in placed}

    def ranking(
        self, query: RankingQuery, tag_holders: Callable[[], Iterable[ModelHolder]]
    ) -> QueryRanking:
        """``query``'s holders on this view as read, to rank; made the first time it is asked.

        A model's holders are grouped (``holder_group``) as the index is built, patched for
        the inventories that changed; a tags query's, listed by ``tag_holders()``, are grouped
        the first time they are asked and kept by later views until an inventory that could
        meet the tags changes. A view's first decision then only looks the group's targets up
        in this view's ``slots``, in C. Shared with every ``with_queued`` copy (they differ
        only in ``requeued`` nodes, which the router ranks again). Two threads may both make
        it; either answer is the same.
        """
        found = self._rankings.get(query)
        if found is None:
            if query[0] == "model":
                holders = self._by_model.get(query[1])
                group = holders.group if holders is not None else EMPTY_GROUP
            else:
                found_group = self._groups.get(query[1])
                if found_group is None:
                    found_group = self._groups[query[1]] = holder_group(tag_holders())
                group = found_group
            count = len(group.buckets)
            found = self._rankings[query] = QueryRanking(group, [None] * count, [None] * count)
        return found

    def with_queued(self, extra: Mapping[str, int]) -> NodeIndex:
        """This view with ``extra[name]`` more jobs waiting on those nodes (jobs this client
        sent since the view was read), sharing the index and its rankings."""
        if not any(extra.values()):
            return self
        copy = NodeIndex.__new__(NodeIndex)
        copy._base, copy._entries = self._base, self._entries
        copy._by_model, copy._by_tag, copy._rankings = self._by_model, self._by_tag, self._rankings
        copy._groups = self._groups
        copy._offer_keys, copy._slots, copy._order = self._offer_keys, self._slots, self._order
        copy._states = dict(self._states)
        for name, count in extra.items():
            state = copy.state(name)
            if state is not None and count:
                copy._states[name] = replace(state, queued=state.queued + count)
        copy._nodes = None
        return copy


def _offer_keys(state: NodeState, entry: NodeEntry) -> list[OfferKey]:
    """The per-node rank key of each healthy backend of an up node."""
    info = state.info
    load = info.in_flight + state.queued
    free = info.capacity - load
    backends: Sequence[BackendInfo] = info.backends
    keys: list[OfferKey] = []
    for offer in entry.offers:
        backend = backends[offer.position]
        if backend.healthy:
            spare = backend.capacity - backend.in_flight
            latency = backend.latency_ms
            keys.append(
                (
                    -(free if free < spare else spare),
                    0.0 if latency is None else latency,
                    load,
                    info.name,
                    backend.name,
                    offer.target,
                )
            )
    return keys


def _ranked_offers(
    states: Iterable[NodeState], entries: Mapping[str, NodeEntry]
) -> tuple[list[OfferKey], list[str], dict[str, int]]:
    """Every healthy backend of an up node, by the per-node part of the rank key, their
    targets in that order, and each one's slot (odd: ``requeued_slots`` puts nodes changed
    since between them; ``span`` when it has none). A stable sort of the nodes in the view's
    order, so exact ties fall as the scan's stable sort has them."""
    keys: list[OfferKey] = []
    targets: list[str] = []
    for state in states:
        entry = entries[state.name]
        targets += [offer.target for offer in entry.offers]
        if state.up:
            keys += _offer_keys(state, entry)
    keys.sort()
    order = [key[5] for key in keys]
    slots = dict.fromkeys(targets, 2 * len(keys) + 2)
    slots.update(zip(order, range(1, 2 * len(keys), 2), strict=True))
    return keys, order, slots


def _kept_groups(
    previous: NodeIndex, changed: list[str], entries: Mapping[str, NodeEntry]
) -> dict[frozenset[str], HolderGroup]:
    """The previous view's tags queries' groups that no ``changed`` node's inventory (as it
    was, or as it is now) can be part of: it could not meet the tags."""
    if not changed:
        return previous._groups
    provides: set[frozenset[str]] = set()
    for name in changed:
        for entry in (previous._entries.get(name), entries.get(name)):
            if entry is not None:
                provides.add(entry.provides)
    return {
        tags: group
        for tags, group in previous._groups.items()
        if not any(tags <= p for p in provides)
    }


ModelMap = dict[str, ModelHolders]
"""Canonical model name -> its holders (node name -> that node's backends holding it)."""


def _holders_by_model(entries: Iterable[NodeEntry]) -> dict[str, dict[str, list[ModelHolder]]]:
    models: dict[str, dict[str, list[ModelHolder]]] = {}
    for entry in entries:
        for offer in entry.offers:
            for canonical, model in offer.by_canonical.items():
                on_node = models.setdefault(canonical, {}).setdefault(entry.name, [])
                on_node.append(model_holder(entry.name, entry.tags, offer, model))
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
        by_model[canonical] = ModelHolders({n: tuple(holders) for n, holders in nodes.items()})
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
    out_targets: set[str] = set()
    for name in changed:
        old = previous._entries.get(name)
        if old is not None:
            touched_models.update(c for o in old.offers for c in o.by_canonical)
            touched_tags.update(old.provides)
            out_targets.update(o.target for o in old.offers)
    gone_targets = frozenset(out_targets)
    new = [entries[n] for n in changed if n in entries]
    added_models = _holders_by_model(new)
    added_tags = _nodes_by_tag(new)
    for canonical in touched_models | added_models.keys():
        before = by_model.get(canonical)
        # A C-level copy, then a few removals.
        inner = dict(before.on_nodes) if before is not None else {}
        for name in out:
            inner.pop(name, None)
        added = added_models.get(canonical, {})
        for name, holders in added.items():
            inner[name] = tuple(holders)
        if inner:
            new_holders = tuple(h for holders in added.values() for h in holders)
            made = before.made_group if before is not None else None
            by_model[canonical] = ModelHolders(inner, (made, gone_targets, new_holders))
        else:
            by_model.pop(canonical, None)
    for tag in touched_tags | added_tags.keys():
        remaining = (by_tag.get(tag, frozenset()) - out) | added_tags.get(tag, set())
        if remaining:
            by_tag[tag] = remaining
        else:
            by_tag.pop(tag, None)
    return by_model, by_tag


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
        if (
            old_backend.models is not backend.models
            or old_backend.name != backend.name
            or old_backend.kind != backend.kind  # its tier is part of the entry
        ):
            return None
    return old_entry
