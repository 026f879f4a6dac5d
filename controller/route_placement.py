"""Where a job for a named route may run (``JobSpec.route_url``), and why nowhere.

Pure, like the router it extends: a route's job goes only to a node that fronts a backend at
the route's endpoint (that backend, even when the node fronts another with the same model) or,
for a cloud route, to a ``--cloud`` worker holding the provider's key, which builds the adapter
itself. Moving the job on before its first token asks again with the tried nodes excluded, so
it stays among the route's servers instead of falling back to any holder of the model.

A job that asks for the ``tools`` or ``vision`` capability (the gateway tags a request with
tools or images so) goes only to a backend whose model has it, as the router's own filter
does; a cloud model the node does not list (an on-demand adapter, a lagging catalogue) is
given the benefit of the doubt: the provider answers for it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from broker.errors import NoNodeAvailable, RoutingError, UnknownModel
from broker.route_url import (
    RouteTarget,
    fronting_backends,
    on_demand_backend,
    parse_route_url,
    serves_on_demand,
)
from broker.schemas import BackendInfo, JobSpec, ModelInfo, NodeInfo, same_model
from controller.router import Candidate, NodeState, _candidate, _rank_key, _usable

__all__ = ["explain_no_route_server", "route_candidates"]


def route_candidates(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    blocked: Collection[str],
    exclude_nodes: Collection[str],
    sticky_node: str | None,
) -> list[Candidate]:
    """Where a job for a route can run: a node's own backend at the route's endpoint (that one
    backend, even if another of the node's backends holds the same model), or, for a cloud
    route, a ``--cloud`` worker holding the provider's key. Never another model holder."""
    target = parse_route_url(spec.route_url or "")
    model = spec.model or ""
    out: list[Candidate] = []
    for state in nodes:
        if not _usable(state, blocked, exclude_nodes):
            continue
        if spec.node is not None and state.name != spec.node:
            continue
        for backend, known in _route_backends(target, state.info, model):
            if not backend.healthy or f"{state.name}/{backend.name}" in blocked:
                continue
            if not _capable(spec, state.info, known):
                continue
            served = known or ModelInfo(name=model)  # a provider's model it does not list
            out.append(_candidate(state, backend, served, 0, sticky_node))
    out.sort(key=_rank_key)
    return out


def _capable(spec: JobSpec, node: NodeInfo, known: ModelInfo | None) -> bool:
    """The model has the capabilities the job asked the router for (tools, vision), by its
    own word or its node's tags; an unlisted model may."""
    needed = spec.tags & spec.needs()
    if not needed or known is None:
        return True
    return needed <= node.tags | (known.capabilities - {"chat"})


def _route_backends(
    target: RouteTarget, info: NodeInfo, model: str
) -> list[tuple[BackendInfo, ModelInfo | None]]:
    """The node's backends that serve the route with ``model`` (and that model's entry)."""
    own = fronting_backends(target, info.backends)
    if own:
        found = []
        for backend in own:
            known = next((m for m in backend.models if same_model(m.name, model)), None)
            # A local server must hold the model; a provider's list may lag its catalogue.
            if known is not None or target.cloud:
                found.append((backend, known))
        return found
    if serves_on_demand(target, info):
        # Built by the worker when the job comes: healthy until its jobs say otherwise
        # (then its breaker opens like any backend's).
        name = on_demand_backend(target.kind)
        offer = BackendInfo(name=name, kind=target.kind, healthy=True, capacity=info.capacity)
        return [(offer, None)]
    return []


def explain_no_route_server(
    spec: JobSpec, nodes: Sequence[NodeState], blocked: Collection[str]
) -> RoutingError:
    """Why no node can take a job for ``spec.route_url``, naming what would fix it."""
    target = parse_route_url(spec.route_url or "")
    route = (
        f"route @{spec.route}"
        if spec.route
        else f"model {spec.model!r} (on no node; a {target.kind} model, so for {target.base_url})"
    )
    able = [
        s
        for s in nodes
        if fronting_backends(target, s.info.backends) or serves_on_demand(target, s.info)
    ]
    if not able:
        return RoutingError(f"{route}: {target.missing_worker_reason()}")
    up = [s for s in able if s.up]
    if not up:
        listed = ", ".join(sorted(s.name for s in able))
        return NoNodeAvailable(f"{route}: every worker that serves it is down ({listed})")
    model = spec.model or ""
    if not any(_route_backends(target, s.info, model) for s in up):
        there = sorted(
            {
                m.name
                for s in up
                for b in fronting_backends(target, s.info.backends)
                for m in b.models
            }
        )
        return UnknownModel(
            f"{route}: model {model!r} is not on {target.base_url} "
            f"(available: {', '.join(there) or 'none'})"
        )
    needed = spec.tags & spec.needs()
    if not any(
        _capable(spec, s.info, known)
        for s in up
        for _backend, known in _route_backends(target, s.info, model)
    ):
        return NoNodeAvailable(
            f"{route}: model {model!r} there has no {' and '.join(sorted(needed))} capability"
            " (the request has tools or images)"
        )
    shut = sorted(
        t
        for s in up
        for t in (
            s.name,
            *(f"{s.name}/{b.name}" for b in s.info.backends),
            f"{s.name}/{on_demand_backend(target.kind)}",
        )
        if t in blocked
    )
    detail = f" ({', '.join(shut)}: circuit breaker open or failed)" if shut else ""
    return NoNodeAvailable(f"{route}: no worker serving it is left to try{detail}")
