"""What a node tells the cluster about itself every few seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from redis.asyncio import Redis

from broker import __version__, names
from broker.catalog import Catalog
from broker.errors import BackendError
from broker.nodeload import inventory_digest, load_of
from broker.quota import quota_left
from broker.schemas import BackendInfo, JobCounters, ModelInfo, NodeInfo
from worker.backends.base import Backend, manages_models
from worker.config import WorkerConfig
from worker.sysinfo import SystemProbe

__all__ = [
    "build_node_info",
    "describe_backend",
    "mark_node_down",
    "publish_node_info",
]

log = logging.getLogger(__name__)

MISSED_HEARTBEATS_BEFORE_DOWN = 3

# The probe used when the caller brings none. It keeps the GPU answer between beats, which is
# why it outlives one call: one per worker process, like the process's logger.
_PROCESS_PROBE = SystemProbe()


async def describe_backend(
    backend: Backend,
    timeout_s: float,
    *,
    in_flight: int = 0,
    latency_ms: float | None = None,
    counters: JobCounters | None = None,
    catalog: Catalog | None = None,
    previous: BackendInfo | None = None,
) -> BackendInfo:
    """A backend's inventory, or its error if it does not answer in time.

    ``catalog``: fill what the backend leaves unsaid about its models (a cloud provider's
    listing gives no context window or capabilities) from the capability table.
    ``previous``: the backend as the last beat described it. A backend running this node's
    jobs that is too busy to list its models in time (a llama.cpp server serves one request at
    a time: a long embedding batch holds the listing back) keeps its last healthy inventory:
    it is working, and calling it down would turn requests for its models into "not
    installed" errors until it answers again."""
    models: list[ModelInfo] = []
    error: str | None = None
    try:
        models = await asyncio.wait_for(backend.inventory(), timeout_s)
    except BackendError as exc:
        error = str(exc)
    except TimeoutError:
        if in_flight and previous is not None and previous.healthy:
            log.debug(
                "%s is busy with %d job(s): its last inventory stands", backend.name, in_flight
            )
            models = list(previous.models)
        else:
            error = f"no answer to the inventory request within {timeout_s:.1f}s"
    if catalog is not None:
        models = [catalog.fill(backend.kind, m) for m in models]
    return BackendInfo(
        name=backend.name,
        kind=backend.kind,
        url=backend.url,
        healthy=error is None,
        error=error,
        # Read after the inventory: an adapter may learn its capacity from the server.
        capacity=backend.capacity,
        in_flight=in_flight,
        latency_ms=latency_ms,
        manages_models=manages_models(backend),
        models=tuple(models),
        counters=counters or JobCounters(),
        quota_left=_quota_left(backend),
    )


def _quota_left(backend: Backend) -> float | None:
    # A cloud adapter keeps its provider's last rate-limit headers (``RateLimits``); local
    # backends have none. Read by duck type: naming the class would import the cloud adapters
    # into every node.
    limits = getattr(backend, "rate_limits", None)
    if limits is None:
        return None
    return quota_left(limits.latest, limits.updated_at, time.time())


async def build_node_info(
    config: WorkerConfig,
    backends: Mapping[str, Backend],
    *,
    instance: str,
    in_flight: int,
    interval_s: float,
    started_at: float,
    backend_in_flight: Mapping[str, int],
    backend_latency_ms: Mapping[str, float],
    system: SystemProbe | None = None,
    capacity: int | None = None,
    backend_counters: Mapping[str, JobCounters] | None = None,
    catalog: Catalog | None = None,
    cloud_providers: frozenset[str] = frozenset(),
    previous: NodeInfo | None = None,
) -> NodeInfo:
    """The node's heartbeat: its backends' inventories and load, and the machine's resources.

    ``backend_in_flight`` and ``backend_latency_ms`` are keyed by backend name; a backend
    missing from them has no job running and no latency measured yet. ``capacity`` is the
    node's job slots; None means the sum over its backends as they describe themselves now.
    ``backend_counters``: each backend's tokens and jobs since the worker started.
    ``catalog``: the capability table that fills the models' gaps (see ``describe_backend``).
    ``cloud_providers``: the provider kinds a ``--cloud`` worker serves routes of.
    ``previous``: the last beat's NodeInfo (see ``describe_backend``).
    """
    before = {b.name: b for b in previous.backends} if previous is not None else {}
    probe = system or _PROCESS_PROBE
    timeout_s = max(0.5, interval_s)
    described, snapshot = await asyncio.gather(
        asyncio.gather(
            *(
                describe_backend(
                    backend,
                    timeout_s,
                    in_flight=backend_in_flight.get(name, 0),
                    latency_ms=backend_latency_ms.get(name),
                    counters=(backend_counters or {}).get(name),
                    catalog=catalog,
                    previous=before.get(name),
                )
                for name, backend in backends.items()
            )
        ),
        probe.snapshot(),
    )
    return NodeInfo(
        name=config.name,
        version=__version__,
        instance=instance,
        tags=config.tags,
        backends=tuple(described),
        memory=snapshot.memory,
        gpus=snapshot.gpus,
        cpu_load=snapshot.cpu_load,
        in_flight=in_flight,
        capacity=capacity or max(1, sum(b.capacity for b in described)),
        heartbeat_interval_s=interval_s,
        started_at=started_at,
        sent_at=time.time(),
        cloud_providers=cloud_providers,
    )


# The load of one beat and the liveness key, when the inventory stored is already this one;
# answers 0 (and writes nothing) when it is not, e.g. after Redis lost its data.
_PUBLISH_LOAD_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return 1
"""


async def publish_node_info(redis: Redis, info: NodeInfo, *, stored: str | None = None) -> str:
    """Record the heartbeat; returns its inventory digest, to pass as ``stored`` next time.

    The load goes out at every beat, the whole NodeInfo (models and all) only when its
    inventory digest differs from ``stored``, or Redis does not hold that inventory. The
    liveness key holds the worker's instance id, so a client can tell a restarted worker
    (whose predecessor's jobs are gone) from the one that took its job."""
    expiry_ms = int(info.heartbeat_interval_s * MISSED_HEARTBEATS_BEFORE_DOWN * 1000)
    digest = inventory_digest(info)
    load = load_of(info, digest).model_dump_json()
    alive = names.node_alive_key(info.name)
    if stored == digest:
        # EVAL, not EVALSHA: the script is short, and the demo's fakeredis broker answers a
        # NOSCRIPT miss by closing the connection.
        keys = [names.NODE_DIGESTS_HASH, names.NODE_LOADS_HASH, alive]
        args: list[str | int] = [info.name, digest, load, info.instance, expiry_ms]
        if await redis.eval(_PUBLISH_LOAD_LUA, len(keys), *keys, *args):
            return digest
    pipe = redis.pipeline(transaction=True)
    pipe.hset(names.NODES_HASH, info.name, info.model_dump_json())
    pipe.hset(names.NODE_DIGESTS_HASH, info.name, digest)
    pipe.hset(names.NODE_LOADS_HASH, info.name, load)
    pipe.set(alive, info.instance, px=expiry_ms)
    await pipe.execute()
    return digest


async def mark_node_down(redis: Redis, node_name: str) -> None:
    """A clean stop: the node shows as down at once instead of after three missed beats."""
    await redis.delete(names.node_alive_key(node_name))
