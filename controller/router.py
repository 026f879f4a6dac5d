"""Choosing where a job runs: a pure function of the job and the cluster's state.

No I/O here: callers read the node list from Redis and pass it in, so the router can be tested
with generated clusters (see tests/controller/test_router.py).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from broker.errors import NoNodeAvailable, RoutingError, UnknownModel, UnknownRoute
from broker.schemas import BackendInfo, JobSpec, NodeInfo


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


@dataclass(frozen=True, slots=True)
class Candidate:
    """One place a job could run, with what made it rank where it did."""

    node: str
    backend: str
    model: str
    model_loaded: bool
    spare: int
    load: int


def _model_on_backend(backend: BackendInfo, wanted: str | None) -> tuple[str, bool] | None:
    """The model this backend would serve the job with, and whether it is loaded now."""
    if wanted is not None:
        for model in backend.models:
            if model.name == wanted:
                return model.name, model.loaded
        return None
    loaded = [m for m in backend.models if m.loaded]
    if loaded:
        return loaded[0].name, True
    if backend.models:
        return backend.models[0].name, False
    return None


def rank_candidates(
    spec: JobSpec, nodes: Sequence[NodeState], open_breakers: Collection[str] = ()
) -> list[Candidate]:
    """Every (node, backend, model) able to serve ``spec``, best first.

    Filters: node up, not behind an open breaker, matching the ``@route`` name, carrying all
    the job's tags, with a healthy backend that has the model. Ranks: model already loaded
    (no swap), then most spare capacity, then fewest jobs, then name for a stable order.
    """
    candidates: list[Candidate] = []
    for node in nodes:
        if not node.up or node.name in open_breakers:
            continue
        if spec.route is not None and node.name != spec.route:
            continue
        if not spec.tags <= node.info.tags:
            continue
        for backend in node.info.backends:
            if not backend.healthy or f"{node.name}/{backend.name}" in open_breakers:
                continue
            choice = _model_on_backend(backend, spec.model)
            if choice is None:
                continue
            model, loaded = choice
            candidates.append(
                Candidate(node.name, backend.name, model, loaded, node.spare, node.load)
            )
    candidates.sort(key=lambda c: (not c.model_loaded, -c.spare, c.load, c.node, c.backend))
    return candidates


def explain_no_candidate(spec: JobSpec, nodes: Sequence[NodeState]) -> RoutingError:
    """The most specific reason nothing can serve ``spec``, for the user to act on."""
    known = sorted(n.name for n in nodes)
    if spec.route is not None:
        matching = [n for n in nodes if n.name == spec.route]
        if not matching:
            listed = ", ".join(known) or "none"
            return UnknownRoute(f"no node named {spec.route!r} (known nodes: {listed})")
        node = matching[0]
        if not node.up:
            return NoNodeAvailable(f"node {spec.route!r} is down")
        nodes = matching
    if spec.model is not None and not any(spec.model in n.info.model_names() for n in nodes):
        everywhere = sorted({m for n in nodes for m in n.info.model_names()})
        where = f"on node {spec.route!r}" if spec.route else "on any node"
        return UnknownModel(
            f"model {spec.model!r} is not installed {where} "
            f"(available: {', '.join(everywhere) or 'none'})"
        )
    up = [n for n in nodes if n.up]
    if not up:
        return NoNodeAvailable("no node is up" if not nodes else "every matching node is down")
    if spec.tags and not any(spec.tags <= n.info.tags for n in up):
        return NoNodeAvailable(f"no up node has the tags {', '.join(sorted(spec.tags))}")
    unhealthy = [
        f"{n.name}/{b.name}: {b.error or 'unhealthy'}"
        for n in up
        for b in n.info.backends
        if not b.healthy
    ]
    detail = f" ({'; '.join(unhealthy)})" if unhealthy else ""
    return NoNodeAvailable(f"no up node has a healthy backend that can serve this job{detail}")


def route(
    spec: JobSpec, nodes: Sequence[NodeState], open_breakers: Collection[str] = ()
) -> list[Candidate]:
    """Like ``rank_candidates``, but raises the RoutingError that explains an empty answer."""
    candidates = rank_candidates(spec, nodes, open_breakers)
    if not candidates:
        raise explain_no_candidate(spec, nodes)
    return candidates
