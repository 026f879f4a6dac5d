"""What a node tells the cluster about itself every few seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import psutil
from redis.asyncio import Redis

from broker import __version__, names
from broker.errors import BackendError
from broker.schemas import BackendInfo, MemoryInfo, ModelInfo, NodeInfo
from worker.backends.base import Backend
from worker.config import WorkerConfig

log = logging.getLogger(__name__)

MISSED_HEARTBEATS_BEFORE_DOWN = 3


async def describe_backend(backend: Backend, timeout_s: float) -> BackendInfo:
    """A backend's inventory, or its error if it does not answer in time."""
    models: list[ModelInfo] = []
    error: str | None = None
    try:
        models = await asyncio.wait_for(backend.inventory(), timeout_s)
    except BackendError as exc:
        error = str(exc)
    except TimeoutError:
        error = f"no answer to the inventory request within {timeout_s:.1f}s"
    return BackendInfo(
        name=backend.name,
        kind=backend.kind,
        url=backend.url,
        healthy=error is None,
        error=error,
        capacity=backend.capacity,
        models=tuple(models),
    )


def memory_now() -> MemoryInfo:
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available)


async def build_node_info(
    config: WorkerConfig,
    backends: Mapping[str, Backend],
    *,
    in_flight: int,
    interval_s: float,
    started_at: float,
) -> NodeInfo:
    described = await asyncio.gather(
        *(describe_backend(b, timeout_s=max(0.5, interval_s)) for b in backends.values())
    )
    return NodeInfo(
        name=config.name,
        version=__version__,
        tags=config.tags,
        backends=tuple(described),
        memory=memory_now(),
        in_flight=in_flight,
        capacity=config.capacity,
        heartbeat_interval_s=interval_s,
        started_at=started_at,
        sent_at=time.time(),
    )


async def publish_node_info(redis: Redis, info: NodeInfo) -> None:
    """Record the heartbeat: the last-known info (kept) and an expiring liveness key.

    The key holds the worker's instance id, so a client can tell a restarted worker (whose
    predecessor's jobs are gone) from the one that took its job."""
    expiry_ms = int(info.heartbeat_interval_s * MISSED_HEARTBEATS_BEFORE_DOWN * 1000)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(names.NODES_HASH, info.name, info.model_dump_json())
    pipe.set(names.node_alive_key(info.name), info.instance, px=expiry_ms)
    await pipe.execute()


async def mark_node_down(redis: Redis, node_name: str) -> None:
    """A clean stop: the node shows as down at once instead of after three missed beats."""
    await redis.delete(names.node_alive_key(node_name))
