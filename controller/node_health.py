"""``corral doctor``'s checks of each node, from its last heartbeat and the breakers."""

from __future__ import annotations

import redis
import redis.exceptions

from broker import __version__, names
from broker.settings import CorralSettings
from controller.breaker import HOLD_REASONS, BreakerPhase
from controller.cluster import read_cluster
from controller.health import Check, Status
from controller.router import NodeState


def check_nodes(
    client: redis.Redis, settings: CorralSettings
) -> tuple[list[Check], list[NodeState]]:
    """The checks, and the nodes read (for ``--probe``)."""
    try:
        view = read_cluster(client)
        registered = client.hkeys(names.NODES_HASH)
    except redis.exceptions.RedisError as exc:
        return [
            Check(
                "nodes",
                "readable",
                Status.FAIL,
                f"cannot read the node list: {exc}",
                "allow corral's Redis user EVALSHA and HKEYS on corral:* keys (ACL)",
            )
        ], []
    checks: list[Check] = []
    listed = {node.name for node in view.nodes}
    for raw in sorted(registered):
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        if name not in listed:
            checks.append(
                Check(
                    f"node {name}",
                    "heartbeat",
                    Status.FAIL,
                    "its heartbeat cannot be read: it runs another wire schema version",
                    f"upgrade corral on {name} to {__version__} (the same as the controller)",
                )
            )
    if not view.nodes and not checks:
        return [
            Check(
                "nodes",
                "registered",
                Status.WARN,
                "no node has ever heartbeated to this broker",
                "start `corral worker` on each node (with the same CORRAL_BROKER_URL)",
            )
        ], []
    for node in view.nodes:
        checks += _node_checks(node, view.redis_time)
        for target, state in sorted(view.breakers.items()):
            if target != node.name and not target.startswith(f"{node.name}/"):
                continue
            phase = state.phase(view.redis_time, settings.breaker_cooldown_s)
            if phase is BreakerPhase.OPEN and state.reason is not None:
                left = state.reopens_at(settings.breaker_cooldown_s) - view.redis_time
                said = HOLD_REASONS.get(state.reason, state.reason)
                checks.append(
                    Check(
                        f"node {node.name}",
                        "breaker",
                        Status.WARN,
                        f"{target} is {said}, as its provider said: no jobs go there for"
                        f" {left:.0f}s more",
                        f"it reopens by itself; `corral nodes --reset-breaker {target}` tries"
                        " sooner",
                    )
                )
            elif phase is not BreakerPhase.CLOSED:
                checks.append(
                    Check(
                        f"node {node.name}",
                        "breaker",
                        Status.FAIL,
                        f"circuit breaker {phase.value} on {target} after "
                        f"{state.failures} failures in a row: no jobs go there",
                        f"fix the cause, then `corral nodes --reset-breaker {target}`",
                    )
                )
    return checks, list(view.nodes)


def _node_checks(node: NodeState, now: float) -> list[Check]:
    info = node.info
    area = f"node {info.name}"
    age = max(0.0, now - info.sent_at)
    if not node.up:
        return [
            Check(
                area,
                "heartbeat",
                Status.FAIL,
                f"down: last heartbeat {_age(age)} ago",
                f"start its worker (`corral worker --name {info.name} …`) and check its link "
                "to the broker (its tunnel, if it has one)",
            )
        ]
    checks = [
        Check(
            area,
            "heartbeat",
            Status.OK,
            f"up, last heartbeat {_age(age)} ago (every {info.heartbeat_interval_s:g} s)",
        )
    ]
    if info.version != __version__:
        checks.append(
            Check(
                area,
                "version",
                Status.WARN,
                f"runs corral {info.version}, the controller {__version__}",
                f"upgrade {info.name} to {__version__} (pip install -U corral, or the rollout)",
            )
        )
    else:
        checks.append(Check(area, "version", Status.OK, f"corral {info.version}"))
    for backend in info.backends:
        where = f"{backend.name} ({backend.url})" if backend.url else backend.name
        if backend.healthy:
            checks.append(
                Check(
                    area,
                    "backend",
                    Status.OK,
                    f"{where} reachable, {backend.in_flight}/{backend.capacity} busy",
                )
            )
        else:
            checks.append(
                Check(
                    area,
                    "backend",
                    Status.FAIL,
                    f"{where} unreachable: {backend.error or 'no answer'}",
                    f"start the server on {info.name}, or correct its URL in the worker's "
                    "configuration",
                )
            )
    models = [m for b in info.backends if b.healthy for m in b.models]
    if any(b.healthy for b in info.backends):
        if models:
            loaded = sum(1 for m in models if m.loaded)
            checks.append(
                Check(area, "models", Status.OK, f"{len(models)} models, {loaded} loaded")
            )
        else:
            checks.append(
                Check(
                    area,
                    "models",
                    Status.WARN,
                    "no models installed: it can serve nothing",
                    f"`corral models pull {info.name} MODEL`",
                )
            )
    return checks


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
