"""Choosing where a job runs: a pure function of the job and the cluster's state.

No I/O here: callers read the node list from Redis and pass it in, so the router can be tested
with generated clusters (see tests/controller/test_router.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import NamedTuple

from broker.errors import NoNodeAvailable, PromptTooLong, RoutingError, UnknownModel, UnknownNode
from broker.schemas import (
    BackendInfo,
    JobKind,
    JobSpec,
    ModelInfo,
    NodeInfo,
    canonical_model_name,
)
from broker.tiers import TIER_ORDER, tier_of_kind
from controller.node_index import ModelHolder, NodeIndex, RankingQuery, model_holder
from controller.ranking import Ranking, in_rank_order


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
    tier: str = "local"
    """The backend's cost tier (``broker.tiers``): cheaper tiers of a model rank first."""
    reason: str | None = None
    """Why this candidate was chosen, set once it is (``controller.tiers.explain_choice``)."""
    context_length: int | None = None
    """The model's context window as the node reports it (None: unknown)."""

    @property
    def backend_target(self) -> str:
        return f"{self.node}/{self.backend}"


def _rank_key(c: Candidate) -> tuple[bool, int, int, bool, int, float, int, str, str]:
    return (
        not c.sticky,
        c.choice,
        TIER_ORDER.get(c.tier, 0),
        not c.model_loaded,
        -c.spare,
        c.latency_ms if c.latency_ms is not None else 0.0,
        c.load,
        c.node,
        c.backend,
    )


PRIORITY_ALIAS = "auto"
"""The alias the ``priority`` list goes by; a job naming no model walks it too."""


def routing_aliases(
    aliases: Mapping[str, Sequence[str]], priority: Sequence[str]
) -> Mapping[str, Sequence[str]]:
    """The aliases the router uses: the configured ones, and ``auto`` for the priority list."""
    if not priority:
        return aliases
    return {**aliases, PRIORITY_ALIAS: tuple(priority)}


CHARS_PER_TOKEN = 4
"""A rough, tokenizer-free estimate: English text averages about four characters a token."""

SMALLEST_CONTEXT = 2048
"""No chat model corral meets has a smaller window: a job needing no more skips the check."""


def estimated_tokens(spec: JobSpec) -> int:
    """Tokens the job needs in a model's context: its prompt (characters / 4) plus the
    answer's ``max_tokens``."""
    chars = sum(len(m.content) for m in spec.messages)
    return chars // CHARS_PER_TOKEN + (spec.options.max_tokens or 0)


def _backend_named(state: NodeState | None, backend: str) -> BackendInfo | None:
    if state is None:
        return None
    return next((b for b in state.info.backends if b.name == backend), None)


def _holds(model: ModelInfo, need: int) -> bool:
    return model.context_length is None or model.context_length >= need


def fitting_context(
    spec: JobSpec, candidates: list[Candidate], state_of: Callable[[str], NodeState | None]
) -> list[Candidate]:
    """The candidates whose model's context holds the job; a model of unknown context stays.

    A job that asks for no model may take another of the same backend's models instead of
    one too small (the loaded one first): "any model" means any model that fits."""
    need = estimated_tokens(spec)
    if need <= SMALLEST_CONTEXT:
        return candidates
    kept: list[Candidate] = []
    swapped = False
    for c in candidates:
        if c.context_length is None or c.context_length >= need:
            kept.append(c)
            continue
        if spec.model is not None:
            continue
        state = state_of(c.node)
        backend = _backend_named(state, c.backend)
        if state is None or backend is None:
            continue
        others = [m for m in backend.models if _fits(m, state.info, spec.tags) and _holds(m, need)]
        pick = next((m for m in others if m.loaded), others[0] if others else None)
        if pick is not None:
            kept.append(
                c._replace(
                    model=pick.name, model_loaded=pick.loaded, context_length=pick.context_length
                )
            )
            swapped = True
    if swapped:
        kept.sort(key=_rank_key)
    return kept


def _short(tokens: int) -> str:
    return f"{tokens / 1000:.0f}k" if tokens >= 10_000 else f"{tokens / 1000:.1f}k"


def _largest_window(
    spec: JobSpec, c: Candidate, state_of: Callable[[str], NodeState | None]
) -> tuple[int, str]:
    """(window, model) of the largest context ``c`` could offer the job."""
    state = state_of(c.node)
    backend = _backend_named(state, c.backend)
    if state is None or backend is None:
        return 0, c.model
    models = [
        m
        for m in backend.models
        if (m.name == c.model if spec.model is not None else _fits(m, state.info, spec.tags))
    ]
    return max(((m.context_length or 0, m.name) for m in models), default=(0, c.model))


def too_long_error(
    spec: JobSpec, candidates: Sequence[Candidate], state_of: Callable[[str], NodeState | None]
) -> PromptTooLong:
    """Why none of ``candidates`` (all too small) can take the job, naming the largest."""
    windows = [(*_largest_window(spec, c, state_of), c.node) for c in candidates]
    window, model, node = max(windows)
    prompt = estimated_tokens(spec) - (spec.options.max_tokens or 0)
    answer = f" + {spec.options.max_tokens} max tokens" if spec.options.max_tokens else ""
    others = "" if len(candidates) == 1 else f" (the largest of {len(candidates)} candidates)"
    return PromptTooLong(
        f"prompt ~{_short(prompt)} tokens{answer} exceeds {model}'s {_short(window)} "
        f"context on {node}{others}"
    )


def wanted_models(spec: JobSpec, aliases: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The models that may serve ``spec``, best first; None means any chat model.

    A job naming no model walks the priority list (the ``auto`` alias) when there is one."""
    if spec.model is None:
        return list(aliases.get(PRIORITY_ALIAS, ())) or None
    return list(aliases.get(spec.model, ())) or [spec.model]


def _fits(model: ModelInfo, node: NodeInfo, tags: frozenset[str], kind: JobKind = "chat") -> bool:
    """The model can answer a job of ``kind`` that asks for ``tags`` on this node.

    A tag is met by the node's configuration or by the model's own capabilities, so a vision
    model gives its node the ``vision`` tag for the jobs that run on it. An embed job goes
    only to a model that says it embeds; a chat job never goes to one that only embeds.
    """
    serves = model.serves_embed() if kind == "embed" else model.serves_chat()
    # "chat" is every chat model's capability: as a tag it would match every node.
    return serves and tags <= node.tags | (model.capabilities - {"chat"})


def _choices_on_backend(
    node: NodeInfo,
    backend: BackendInfo,
    wanted: list[str] | None,
    tags: frozenset[str],
    kind: JobKind = "chat",
) -> list[tuple[int, ModelInfo]]:
    """(preference, model) pairs this backend could serve the job with."""
    if wanted is not None:
        # "llama3" and "llama3:latest" are one model to Ollama, and so to the router.
        by_name = {canonical_model_name(m.name): m for m in backend.models}
        found = [(i, by_name.get(canonical_model_name(name))) for i, name in enumerate(wanted)]
        return [(i, m) for i, m in found if m is not None and _fits(m, node, tags, kind)]
    fitting = [m for m in backend.models if _fits(m, node, tags, kind)]
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
    fit_context: bool = True,
) -> Sequence[Candidate]:
    """Every (node, backend, model) able to serve ``spec``, best first.

    Filters: node up, not excluded (already tried), not behind an open breaker (``blocked``
    holds node names and ``node/backend`` targets), matching the pinned node (``@name``),
    meeting the job's tags, with a healthy backend that has a wanted model whose context
    window (when known) holds the job's estimated tokens (``fit_context``). Ranks: the
    session's node first, then the alias's order of preference, then model already loaded (no
    swap), then most spare capacity, then lowest recent latency, then fewest jobs, then name.

    ``nodes`` is best given as a ``NodeIndex`` (the cluster view keeps one): then only the
    backends holding a wanted model, or the nodes offering the job's tags, are looked at. A
    plain list is indexed first. The answer is the same as ``rank_candidates_by_scan``'s; from
    an index it is a ``Ranking``, which makes each candidate only when it is read (a job
    takes the first, a failover the next: the rest are never made).
    """
    if spec.route_url is not None:
        # Placing a route's job is its own module's business (it builds on this one).
        from controller.route_placement import route_candidates  # noqa: PLC0415

        return route_candidates(spec, nodes, blocked, exclude_nodes, sticky_node)
    if spec.node is not None or spec.kind == "embed":
        # A pinned job looks at its one node; an embed job scans every node (the index serves
        # chat models, and embed jobs are few).
        scanned: Sequence[NodeState] = nodes
        if spec.node is not None:
            index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
            pinned = index.state(spec.node)
            scanned = [pinned] if pinned is not None else []
        return rank_candidates_by_scan(
            spec,
            scanned,
            blocked,
            aliases=aliases,
            exclude_nodes=exclude_nodes,
            sticky_node=sticky_node,
            fit_context=fit_context,
        )
    index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
    wanted = wanted_models(spec, aliases or {})
    queries: list[RankingQuery] = (
        [("model", canonical_model_name(name)) for name in wanted]
        if wanted is not None
        else [("tags", spec.tags)]
    )

    # The answer is read after this returns: it must see the filters as they are now.
    blocked, exclude_nodes = frozenset(blocked), frozenset(exclude_nodes)

    def holders_in_order() -> Iterator[tuple[int, ModelHolder]]:
        # Model by model of the alias (the key's ``choice``), each model's holders ranked.
        for choice, query in enumerate(queries):
            tags = query[1] if query[0] == "tags" else frozenset()
            ranking = index.ranking(query, partial(_tag_holders, index, tags))
            ordered = in_rank_order(
                index,
                ranking,
                exclude_nodes=exclude_nodes,
                blocked=blocked,
                tags=spec.tags if query[0] == "model" else frozenset(),
            )
            for holder in ordered:
                yield choice, holder

    def made(sticky: bool | None) -> Iterator[Candidate]:
        """Candidates of the holders in order: all (``sticky`` None), or only those on the
        session's node (True) or only those elsewhere (False)."""
        for choice, holder in holders_in_order():
            if sticky is not None and (holder.node == sticky_node) is not sticky:
                continue
            state = index.state(holder.node)
            if state is not None:
                backend = state.info.backends[holder.offer.position]
                yield _candidate(state, backend, holder.model, choice, sticky_node)

    # The session's node first: it holds the conversation (its candidates are walked twice).
    candidates = made(None) if sticky_node is None else chain(made(True), made(False))
    need = estimated_tokens(spec)
    if not fit_context or need <= SMALLEST_CONTEXT:
        return Ranking(candidates)
    if spec.model is not None:
        # Too small a window only drops a candidate (no other model is swapped in): in order.
        return Ranking(
            c for c in candidates if c.context_length is None or c.context_length >= need
        )
    return fitting_context(spec, list(candidates), index.state)


def _tag_holders(index: NodeIndex, tags: frozenset[str]) -> list[ModelHolder]:
    """Every holder that could take a chat job needing ``tags`` and naming no model, as far as
    the inventory says, before a job's own filters (breakers, nodes tried, session) and the
    view's (up, healthy: ``NodeIndex.slots``)."""
    out: list[ModelHolder] = []
    for name in index.nodes_offering(tags):
        entry = index.entry(name)
        if entry is None or not tags <= entry.provides:
            continue
        if tags <= entry.tags:
            # Every chat model meets the tags: the pick is known in advance.
            out += [h for h in entry.default_holders if h is not None]
            continue
        state = index.state(name)
        if state is None:
            continue
        for offer in entry.offers:
            backend = state.info.backends[offer.position]
            for _, model in _choices_on_backend(state.info, backend, None, tags):
                out.append(model_holder(name, entry.tags, offer, model))
    return out


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
        tier_of_kind(backend.kind),
        context_length=model.context_length,
    )


def rank_candidates_by_scan(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    exclude_nodes: Collection[str] = (),
    sticky_node: str | None = None,
    fit_context: bool = True,
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
            choices = _choices_on_backend(node.info, backend, wanted, spec.tags, spec.kind)
            for choice, model in choices:
                candidates.append(_candidate(node, backend, model, choice, sticky_node))
    candidates.sort(key=_rank_key)
    if fit_context:
        return fitting_context(spec, candidates, {n.name: n for n in nodes}.get)
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
    if spec.route_url is not None:
        from controller.route_placement import explain_no_route_server  # noqa: PLC0415

        return explain_no_route_server(spec, nodes, blocked)
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
        if wanted == [spec.model]:
            what = f"model {spec.model!r}"
        elif spec.model is None:
            what = f"none of the priority list's models ({', '.join(wanted)})"
        else:
            what = f"none of alias {spec.model!r}'s models ({', '.join(wanted)})"
        return UnknownModel(
            f"{what} is not installed {where} (available: {', '.join(everywhere) or 'none'})"
        )
    up = [n for n in nodes if n.up]
    if not up:
        return NoNodeAvailable("no node is up" if not nodes else "every matching node is down")
    if spec.kind == "chat" and wanted is not None:
        holding = [
            m
            for n in up
            for b in n.info.backends
            for m in b.models
            if canonical_model_name(m.name) in wanted_names
        ]
        if holding and not any(m.serves_chat() for m in holding):
            return UnknownModel(
                f"model {spec.model!r} is an embedding model: it cannot chat (ask it for "
                "embeddings instead)"
            )
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
    if spec.kind == "embed":
        embedders = [m for n in up for b in n.info.backends for m in b.models if m.serves_embed()]
        if wanted is not None and not any(
            canonical_model_name(m.name) in wanted_names for m in embedders
        ):
            return UnknownModel(
                f"model {spec.model!r} is not an embedding model on any up node "
                f"(embedding models: {', '.join(sorted({m.name for m in embedders})) or 'none'})"
            )
        if not embedders:
            return NoNodeAvailable("no up node has an embedding model")
    elif spec.tags and not any(
        m.serves_chat() and spec.tags <= n.info.tags | (m.capabilities - {"chat"})
        for n in up
        for b in n.info.backends
        for m in b.models
    ):
        return NoNodeAvailable(
            f"only models that cannot chat have the tags {', '.join(sorted(spec.tags))} "
            "(an embedding model, say): ask it for embeddings instead (corral embed)"
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
    why = blocked if isinstance(blocked, Mapping) else {}
    reasons = [*unhealthy, *(f"{t}: {why.get(t, 'circuit breaker open')}" for t in shut)]
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
) -> Sequence[Candidate]:
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
        unfit = rank_candidates(
            spec,
            nodes,
            blocked,
            aliases=aliases,
            exclude_nodes=exclude_nodes,
            fit_context=False,
        )
        if unfit:
            states = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
            raise too_long_error(spec, unfit, states.state)
        raise explain_no_candidate(
            spec, nodes, blocked, aliases=aliases, exclude_nodes=exclude_nodes
        )
    return candidates
