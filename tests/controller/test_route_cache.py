"""The route table as the gateway reads it: once per ``route_cache_s`` over a real Redis, so an
edit made by another process (``corral route add``, ``rm``, ``off``) shows within that time."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio import Redis

from broker.errors import ConfigError, UnknownNode
from controller.routes import AsyncRouteCache, RouteStore, make_route
from tests.controller.test_routes import NODES


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hgetall_calls(sync: redis.Redis) -> int:
    stats = sync.info("commandstats").get("cmdstat_hgetall", {})
    return int(stats.get("calls", 0))


def test_a_route_edit_shows_once_the_table_is_older_than_its_max_age(broker_url: str) -> None:
    sync = redis.Redis.from_url(broker_url)
    store = RouteStore(sync)
    store.add(make_route("coder", "ollama://127.0.0.1:11434", "llama3"))

    async def scenario() -> None:
        clock = Clock()
        async with Redis.from_url(broker_url) as client:
            cache = AsyncRouteCache(client, clock=clock)
            mention = await cache.mention("coder", NODES, max_age_s=0.5)
            assert mention.route_name == "coder" and mention.model == "llama3"

            store.add(make_route("coder", "ollama://127.0.0.1:11434", "qwen"), replace=True)
            store.add(make_route("writer", "ollama://127.0.0.1:11434", "llama3"))
            clock.now += 0.4  # within the max age: the table read before the edit
            assert (await cache.mention("coder", NODES, max_age_s=0.5)).model == "llama3"
            with pytest.raises(UnknownNode, match="no route of that name"):
                await cache.mention("writer", NODES, max_age_s=0.5)

            clock.now += 0.2  # past it: read again, both edits show
            assert (await cache.mention("coder", NODES, max_age_s=0.5)).model == "qwen"
            assert (await cache.mention("writer", NODES, max_age_s=0.5)).route_name == "writer"

            store.remove("writer")
            store.set_enabled(False)
            clock.now += 0.6
            with pytest.raises(UnknownNode, match="no route of that name"):
                await cache.mention("writer", NODES, max_age_s=0.5)
            with pytest.raises(ConfigError, match="routing is off"):
                await cache.mention("coder", NODES, max_age_s=0.5)

            # A node's name is still a node when no route has it.
            assert (await cache.mention("pi1", NODES, max_age_s=0.5)).node == "pi1"
            # max_age_s 0 (route_cache_s: 0) reads on every call.
            store.set_enabled(True)
            clock.now += 0.001
            assert (await cache.mention("coder", NODES, max_age_s=0)).model == "qwen"

    asyncio.run(scenario())


def test_requests_within_the_max_age_cost_one_read_between_them(broker_url: str) -> None:
    sync = redis.Redis.from_url(broker_url)
    RouteStore(sync).add(make_route("coder", "ollama://127.0.0.1:11434", "llama3"))

    async def scenario() -> int:
        async with Redis.from_url(broker_url) as client:
            cache = AsyncRouteCache(client)
            before = hgetall_calls(sync)
            # A burst at once shares one read; later ones within the max age read nothing.
            await asyncio.gather(*(cache.mention("coder", NODES, max_age_s=60) for _ in range(20)))
            for _ in range(20):
                await cache.mention("coder", NODES, max_age_s=60)
            return hgetall_calls(sync) - before

    assert asyncio.run(scenario()) == 1
