"""Reading the cluster's state over an asyncio Redis: the same one round trip as
``controller.cluster.read_cluster``, and the same parsing.

``controller.cluster`` is being reworked for scale; until it exposes its script call and its
reply parser as functions without I/O, this reuses its script text and row parser as they are.
"""

from __future__ import annotations

from redis.asyncio import Redis as AsyncRedis

from broker import names
from controller.breaker import AsyncBreakers, parse_breakers
from controller.cluster import _READ_NODES_LUA, ClusterView, _node_states
from controller.stream_control import AsyncStreamControl


async def preload_scripts_async(redis: AsyncRedis) -> None:
    """Every script the asyncio client runs, loaded up front: no NOSCRIPT miss on a first
    call (which fakeredis's TCP server, the demo's fallback broker, answers by closing the
    connection)."""
    await redis.script_load(_READ_NODES_LUA)
    await AsyncBreakers.preload_into(redis)
    await AsyncStreamControl.preload_into(redis)


async def read_cluster_async(redis: AsyncRedis) -> ClusterView:
    """Every node that ever heartbeated, with liveness and queue depth, and every breaker."""
    alive_prefix, alive_suffix = names.node_alive_key("\0").split("\0")
    queue_prefix = names.node_queue("")
    steps = [str(step) for step in names.PRIORITY_STEPS if step != 0]
    script = redis.register_script(_READ_NODES_LUA)
    rows, breaker_entries, seconds, micros = await script(
        keys=[names.NODES_HASH, names.BREAKERS_HASH],
        args=[alive_prefix, alive_suffix, queue_prefix, names.PRIORITY_SEPARATOR, *steps],
    )
    return ClusterView(
        nodes=_node_states(rows),
        breakers=parse_breakers(breaker_entries),
        redis_time=int(seconds) + int(micros) / 1_000_000,
    )
