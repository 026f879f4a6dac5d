"""Choosing where a job runs: a pure function of the job and the cluster's state.

No I/O here: callers read the node list from Redis and pass it in, so the router can be tested
with generated clusters (see tests/controller/test_router.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from broker.errors import NoNodeAvailable, RoutingError, UnknownModel, UnknownNode
from broker.schemas import BackendInfo, JobSpec, ModelInfo, NodeInfo, canonical_model_name
from controller.node_index import BackendOffer, NodeIndex, Ranked, RankingQuery


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's last heartbeat, whether it is up now, and how many jobs wait in its queue."""

    info: NodeInfo
    up: bool
    queued: int = 0

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def load(self) -> int:
        return self.info.in_flight + self.queued

    @property
    def spare(self) -> int:
        return self.info.capacity - self.load


class Candidate(NamedTuple):
    """One place a job could run, with what made it rank where it did.

    A named tuple, not a dataclass: a large fleet makes hundreds per decision, and a tuple is
    ten times cheaper to make than a frozen dataclass.
    """

    node: str
    backend: str
    model: str
    model_loaded: bool
    spare: int
    load: int
    choice: int = 0
    """Position of ``model`` in the alias's list (0 for a plain model name)."""
    sticky: bool = False
    """The node already holds this job's conversation (``--session``)."""
    latency_ms: float | None = None
    instance: str = ""
    """The node's worker process when the router saw it (a restart changes it)."""

    @property
    def backend_target(self) -> str:
        return f"{self.node}/{self.backend}"


def _rank_key(c: Candidate) -> tuple[bool, int, bool, int, float, int, str, str]:
    return (
        not c.sticky,
        c.choice,
        not c.model_loaded,
        -c.spare,
        c.latency_ms if c.latency_ms is not None else 0.0,
        c.load,
        c.node,
        c.backend,
    )


def wanted_models(spec: JobSpec, aliases: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The models that may serve ``spec``, best first; None means any chat model."""
    if spec.model is None:
        return None
    return list(aliases.get(spec.model, ())) or [spec.model]


def _fits(model: ModelInfo, node: NodeInfo, tags: frozenset[str]) -> bool:
    """The model can answer a chat job that asks for ``tags`` on this node.

    A tag is met by the node's configuration or by the model's own capabilities, so a vision
    model gives its node the ``vision`` tag for the jobs that run on it.
    """
    # "chat" is every chat model's capability: as a tag it would match every node.
    return model.serves_chat() and tags <= node.tags | (model.capabilities - {"chat"})


def _choices_on_backend(
    node: NodeInfo, backend: BackendInfo, wanted: list[str] | None, tags: frozenset[str]
) -> list[tuple[int, ModelInfo]]:
    """(preference, model) pairs this backend could serve the job with."""
    if wanted is not None:
        # "llama3" and "llama3:latest" are one model to Ollama, and so to the router.
        by_name = {canonical_model_name(m.name): m for m in backend.models}
        found = [(i, by_name.get(canonical_model_name(name))) for i, name in enumerate(wanted)]
        return [(i, m) for i, m in found if m is not None and _fits(m, node, tags)]
    fitting = [m for m in backend.models if _fits(m, node, tags)]
    # Any model will do: the loaded one (no swap), else the first; one per backend.
    loaded = [m for m in fitting if m.loaded]
    pick = loaded[0] if loaded else (fitting[0] if fitting else None)
    return [(0, pick)] if pick is not None else []


def rank_candidates(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    exclude_nodes: Collection[str] = (),
    sticky_node: str | None = None,
) -> list[Candidate]:
    """Every (node, backend, model) able to serve ``spec``, best first.

    Filters: node up, not excluded (already tried), not behind an open breaker (``blocked``
    holds node names and ``node/backend`` targets), matching the pinned node (``@name``),
    meeting the job's tags, with a healthy backend that has a wanted model. Ranks: the
    session's node first, then the alias's order of preference, then model already loaded (no
    swap), then most spare capacity, then lowest recent latency, then fewest jobs, then name.

    ``nodes`` is best given as a ``NodeIndex`` (the cluster view keeps one): then only the
    backends holding a wanted model, or the nodes offering the job's tags, are looked at. A
    plain list is indexed first. The answer is the same as ``rank_candidates_by_scan``'s.
    """
    index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
    if spec.node is not None:
        pinned = index.state(spec.node)
        return rank_candidates_by_scan(
            spec,
            [pinned] if pinned is not None else [],
            blocked,
            aliases=aliases,
            exclude_nodes=exclude_nodes,
            sticky_node=sticky_node,
        )
    wanted = wanted_models(spec, aliases or {})
    queries: list[RankingQuery] = (
        [("model", canonical_model_name(name)) for name in wanted]
        if wanted is not None
        else [("tags", spec.tags)]
    )
    changed = index.requeued
    out: list[Candidate] = []
    for choice, query in enumerate(queries):
        ranking = index.ranking(query, partial(_ranked, index, query, base=True))
        tag_filter = spec.tags if query[0] == "model" else frozenset()
        if blocked or exclude_nodes or changed or tag_filter:
            skip = {*blocked, *exclude_nodes, *changed}
            if blocked or tag_filter:
                kept = [
                    r
                    for r in ranking
                    if r.node not in skip and r.target not in blocked and tag_filter <= r.provides
                ]
            else:  # the usual case: only the nodes sent to since the view was read
                kept = [r for r in ranking if r.node not in skip]
            if changed:
                for r in _ranked(index, query, changed, base=False):
                    if (
                        r.node not in blocked
                        and r.node not in exclude_nodes
                        and r.target not in blocked
                        and tag_filter <= r.provides
                    ):
                        # A few nodes: put each in its place rather than sort the lot.
                        bisect.insort(kept, r, key=_by_key)
            ranking = kept
        if choice:
            out += [r.candidate._replace(choice=choice) for r in ranking]
        else:
            out += [r.candidate for r in ranking]
    if sticky_node is not None:
        first = [c._replace(sticky=True) for c in out if c.node == sticky_node]
        if first:
            out = first + [c for c in out if c.node != sticky_node]
    return out


def _by_key(ranked: Ranked) -> tuple[bool, int, bool, int, float, int, str, str]:
    return ranked.key


def _ranked(
    index: NodeIndex, query: RankingQuery, only: Collection[str] | None, *, base: bool
) -> list[Ranked]:
    """Every candidate for ``query`` on this view, best first, before a job's own filters
    (breakers, nodes tried, extra tags, session): what the index keeps per view and query.
    ``only``: just these nodes. ``base``: the nodes as the view was read; else with the jobs
    sent since (``with_queued``)."""
    lookup = index.base_state if base else index.state
    out: list[Ranked] = []
    if query[0] == "model":
        for holder in index.holders(query[1]):
            if not holder.chats or (only is not None and holder.node not in only):
                continue
            state = lookup(holder.node)
            if state is None or not state.up:
                continue
            backend = state.info.backends[holder.offer.position]
            if backend.healthy:
                out.append(_ranked_one(state, backend, holder.model, holder.offer, holder.provides))
    else:
        tags = query[1]
        for name in index.nodes_offering(tags) if only is None else only:
            state = lookup(name)
            entry = index.entry(name)
            # ``only`` (the nodes changed since the last view) may name nodes that cannot meet
            # the tags: skipped here, before looking at each of their models.
            if state is None or entry is None or not state.up or not tags <= entry.provides:
                continue
            for offer in entry.offers:
                backend = state.info.backends[offer.position]
                if not backend.healthy:
                    continue
                if tags <= state.info.tags:
                    # Every chat model meets the tags: the pick is known in advance.
                    picks = [(0, offer.default_pick)] if offer.default_pick is not None else []
                else:
                    picks = _choices_on_backend(state.info, backend, None, tags)
                for _, model in picks:
                    out.append(_ranked_one(state, backend, model, offer, tags))
    out.sort(key=_by_key)
    return out


def _ranked_one(
    state: NodeState,
    backend: BackendInfo,
    model: ModelInfo,
    offer: BackendOffer,
    provides: frozenset[str],
) -> Ranked:
    """A candidate of a kept ranking (no alias choice, no session) with its sort key: the
    per-candidate step of every first decision in a view, so it builds both in one go."""
    info = state.info
    node = info.name
    load = info.in_flight + state.queued
    spare = min(info.capacity - load, backend.capacity - backend.in_flight)
    latency = backend.latency_ms
    backend_name = backend.name
    # The same key as _rank_key(candidate), made directly: one tuple fewer per candidate.
    key = (
        True,
        0,
        not model.loaded,
        -spare,
        0.0 if latency is None else latency,
        load,
        node,
        backend_name,
    )
    candidate = Candidate(
        node, backend_name, model.name, model.loaded, spare, load, 0, False, latency, info.instance
    )
    return Ranked(key, candidate, node, offer.target, provides)


def _usable(state: NodeState, blocked: Collection[str], exclude_nodes: Collection[str]) -> bool:
    return state.up and state.name not in blocked and state.name not in exclude_nodes


def _candidate(
    state: NodeState,
    backend: BackendInfo,
    model: ModelInfo,
    choice: int,
    sticky_node: str | None,
) -> Candidate:
    return Candidate(
        state.info.name,
        backend.name,
        model.name,
        model.loaded,
        min(state.spare, backend.spare),
        state.load,
        choice,
        state.info.name == sticky_node,
        backend.latency_ms,
        state.info.instance,
    )


def rank_candidates_by_scan(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    exclude_nodes: Collection[str] = (),
    sticky_node: str | None = None,
) -> list[Candidate]:
    """``rank_candidates`` by looking at every model of every node: the definition the index
    must agree with (a property test compares them), and the baseline of benchmarks/routing.py."""
    wanted = wanted_models(spec, aliases or {})
    candidates: list[Candidate] = []
    for node in nodes:
        if not _usable(node, blocked, exclude_nodes):
            continue
        if spec.node is not None and node.name != spec.node:
            continue
        for backend in node.info.backends:
            if not backend.healthy or f"{node.name}/{backend.name}" in blocked:
                continue
            for choice, model in _choices_on_backend(node.info, backend, wanted, spec.tags):
                candidates.append(_candidate(node, backend, model, choice, sticky_node))
    candidates.sort(key=_rank_key)
    return candidates


def explain_no_candidate(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    exclude_nodes: Collection[str] = (),
) -> RoutingError:
    """The most specific reason nothing can serve ``spec``, for the user to act on."""
    known = sorted(n.name for n in nodes)
    if spec.node is not None:
        matching = [n for n in nodes if n.name == spec.node]
        if not matching:
            listed = ", ".join(known) or "none"
            return UnknownNode(f"no node named {spec.node!r} (known nodes: {listed})")
        node = matching[0]
        if not node.up:
            return NoNodeAvailable(f"node {spec.node!r} is down")
        nodes = matching
    wanted = wanted_models(spec, aliases or {})
    wanted_names = {canonical_model_name(w) for w in wanted or ()}
    if wanted is not None and not any(
        wanted_names & {canonical_model_name(m) for m in n.info.model_names()} for n in nodes
    ):
        everywhere = sorted({m for n in nodes for m in n.info.model_names()})
        where = f"on node {spec.node!r}" if spec.node else "on any node"
        what = (
            f"model {spec.model!r}"
            if wanted == [spec.model]
            else f"none of alias {spec.model!r}'s models ({', '.join(wanted)})"
        )
        return UnknownModel(
            f"{what} is not installed {where} (available: {', '.join(everywhere) or 'none'})"
        )
    up = [n for n in nodes if n.up]
    if not up:
        return NoNodeAvailable("no node is up" if not nodes else "every matching node is down")
    tried = [n for n in up if n.name in exclude_nodes]
    if tried and len(tried) == len(up):
        return NoNodeAvailable(
            f"no node left to try (tried {', '.join(sorted(n.name for n in tried))})"
        )
    if spec.tags and not any(
        spec.tags <= n.info.tags | (m.capabilities - {"chat"})
        for n in up
        for b in n.info.backends
        for m in b.models
    ):
        return NoNodeAvailable(f"no up node or model has the tags {', '.join(sorted(spec.tags))}")
    if spec.tags and not any(
        m.serves_chat() and spec.tags <= n.info.tags | (m.capabilities - {"chat"})
        for n in up
        for b in n.info.backends
        for m in b.models
    ):
        return NoNodeAvailable(
            f"only models that cannot chat have the tags {', '.join(sorted(spec.tags))} "
            "(an embedding model, say); corral routes chat jobs"
        )
    shut = sorted(
        t
        for n in up
        for t in (n.name, *(f"{n.name}/{b.name}" for b in n.info.backends))
        if t in blocked
    )
    unhealthy = [
        f"{n.name}/{b.name}: {b.error or 'unhealthy'}"
        for n in up
        for b in n.info.backends
        if not b.healthy
    ]
    reasons = [*unhealthy, *(f"{t}: circuit breaker open" for t in shut)]
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return NoNodeAvailable(f"no up node has a healthy backend that can serve this job{detail}")


def candidates_for(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    exclude_nodes: Collection[str] = (),
    sticky_node: str | None = None,
) -> list[Candidate]:
    """Like ``rank_candidates``, but raises the RoutingError that explains an empty answer."""
    candidates = rank_candidates(
        spec,
        nodes,
        blocked,
        aliases=aliases,
        exclude_nodes=exclude_nodes,
        sticky_node=sticky_node,
    )
    if not candidates:
        raise explain_no_candidate(
            spec, nodes, blocked, aliases=aliases, exclude_nodes=exclude_nodes
        )
    return candidates
