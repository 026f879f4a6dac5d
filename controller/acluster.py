"""Reading the cluster's state over an asyncio Redis: the same one round trip and the same
parsing as ``controller.cluster.ClusterReader``, whose request and reply handling do no I/O."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis as AsyncRedis

from controller.apublisher import AsyncPublisher
from controller.breaker import AsyncBreakers
from controller.cluster import READ_NODES_LUA, ClusterReader, ClusterView
from controller.stream_control import AsyncStreamControl


async def preload_scripts_async(redis: AsyncRedis) -> None:
    """Every script the asyncio client runs, loaded up front: no NOSCRIPT miss on a first
    call (which fakeredis's TCP server, the demo's fallback broker, answers by closing the
    connection)."""
    await redis.script_load(READ_NODES_LUA)
    await AsyncBreakers.preload_into(redis)
    await AsyncStreamControl.preload_into(redis)
    await AsyncPublisher.preload_into(redis)


class AsyncClusterReader:
    """``ClusterReader`` over an asyncio Redis: reads take turns, as the reader keeps each
    node's parsed inventory between them."""

    def __init__(self) -> None:
        self._core = ClusterReader()
        self._turn = asyncio.Lock()

    async def read(self, redis: AsyncRedis) -> ClusterView:
        async with self._turn:
            keys, args = self._core.request()
            reply = await redis.register_script(READ_NODES_LUA)(keys=keys, args=args)
            return self._core.apply(reply)


async def read_cluster_async(redis: AsyncRedis) -> ClusterView:
    """The cluster view, read afresh (an ``AsyncClusterReader`` keeps inventories)."""
    return await AsyncClusterReader().read(redis)
