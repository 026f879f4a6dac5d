"""A heartbeat in two parts: the inventory, which rarely changes, and the load, which always does.

A node's ``NodeInfo`` is mostly its models (about 23 KB for 100 of them); what changes from one
beat to the next is a few numbers. The worker stores the whole ``NodeInfo`` only when its
inventory digest changes, and a small ``NodeLoad`` every beat; a controller keeps each node's
parsed inventory by digest and applies the load to it, so reading a large fleet costs what
changed, not every model of every node.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field

from broker.schemas import (
    HEARTBEAT_CONFIG,
    GpuInfo,
    JobCounters,
    MemoryInfo,
    Message,
    Name,
    NodeInfo,
    _OmitsUnusedAdditions,
)

_VOLATILE_NODE_FIELDS = {"instance", "in_flight", "memory", "gpus", "cpu_load", "sent_at"}
_VOLATILE_BACKEND_FIELDS = {"in_flight", "latency_ms", "counters", "quota_left"}
_INVENTORY_ONLY: Any = {
    **dict.fromkeys(_VOLATILE_NODE_FIELDS, True),
    "backends": {"__all__": _VOLATILE_BACKEND_FIELDS},
}


class BackendLoad(_OmitsUnusedAdditions):
    model_config = HEARTBEAT_CONFIG
    _omit_at_default = ("quota_left",)

    name: Name
    in_flight: int = Field(default=0, ge=0)
    latency_ms: float | None = None
    counters: JobCounters = JobCounters()
    quota_left: float | None = Field(default=None, ge=0, le=1)


class NodeLoad(Message):
    """What changes at every heartbeat, with the digest of the inventory it goes with."""

    model_config = HEARTBEAT_CONFIG

    name: Name
    inventory: str = Field(min_length=8, max_length=64)
    instance: str = ""
    in_flight: int = Field(ge=0)
    memory: MemoryInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    cpu_load: float | None = None
    sent_at: float
    backends: tuple[BackendLoad, ...] = ()


def inventory_digest(info: NodeInfo) -> str:
    """Changes exactly when something but the load changes: models, loaded flags, health,
    tags, capacity, version, interval."""
    inventory = info.model_dump_json(exclude=_INVENTORY_ONLY)
    return hashlib.blake2b(inventory.encode(), digest_size=12).hexdigest()


def load_of(info: NodeInfo, digest: str) -> NodeLoad:
    return NodeLoad(
        name=info.name,
        inventory=digest,
        instance=info.instance,
        in_flight=info.in_flight,
        memory=info.memory,
        gpus=info.gpus,
        cpu_load=info.cpu_load,
        sent_at=info.sent_at,
        backends=tuple(
            BackendLoad(
                name=b.name,
                in_flight=b.in_flight,
                latency_ms=b.latency_ms,
                counters=b.counters,
                quota_left=b.quota_left,
            )
            for b in info.backends
        ),
    )


def with_load(inventory: NodeInfo, load: NodeLoad) -> NodeInfo:
    """``inventory`` with ``load``'s numbers; model lists are shared, not copied (so a router
    index can tell an unchanged inventory by identity)."""
    by_backend = {b.name: b for b in load.backends}
    backends = tuple(
        b.model_copy(
            update={
                "in_flight": by_backend[b.name].in_flight,
                "latency_ms": by_backend[b.name].latency_ms,
                "counters": by_backend[b.name].counters,
                "quota_left": by_backend[b.name].quota_left,
            }
        )
        if b.name in by_backend
        else b
        for b in inventory.backends
    )
    return inventory.model_copy(
        update={
            "instance": load.instance,
            "in_flight": load.in_flight,
            "memory": load.memory,
            "gpus": load.gpus,
            "cpu_load": load.cpu_load,
            "sent_at": load.sent_at,
            "backends": backends,
        }
    )
