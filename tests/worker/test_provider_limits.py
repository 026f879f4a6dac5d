"""A provider's rate-limit headers: kept by the adapter, published by the heartbeat, read back
for ``corral nodes`` in a few words, for OpenAI's names and Anthropic's alike."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis
from redis.asyncio import Redis

from broker import names
from controller.provider_limits import read_provider_headers
from worker.backends.cloud import RateLimits
from worker.provider_limits import PROVIDER_LIMITS_TTL_S, publish_provider_limits

OPENAI_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29950",
    "x-ratelimit-reset-tokens": "100ms",
    "authorization": "Bearer sk-must-not-be-kept",
}


class CloudLike:
    """Just what the heartbeat reads of an adapter: its ``rate_limits``."""

    def __init__(self) -> None:
        self.rate_limits = RateLimits(("x-ratelimit-",))


def test_headers_go_to_redis_once_per_change_and_read_back_as_a_summary(broker_url: str) -> None:
    backend = CloudLike()
    published: dict[str, int] = {}
    backends: dict[str, Any] = {"gpt": backend, "local": object()}

    async def beats() -> list[int]:
        client = Redis.from_url(broker_url)
        writes = []
        try:
            await publish_provider_limits(client, "edge", backends, published)  # nothing yet
            writes.append(await client.exists(names.provider_limits_key("edge", "gpt")))
            backend.rate_limits.record(httpx.Response(200, headers=OPENAI_HEADERS))
            await publish_provider_limits(client, "edge", backends, published)
            await client.hset(names.provider_limits_key("edge", "gpt"), "marker", "1")
            await publish_provider_limits(client, "edge", backends, published)  # unchanged
            writes.append(await client.hexists(names.provider_limits_key("edge", "gpt"), "marker"))
            writes.append(await client.ttl(names.provider_limits_key("edge", "gpt")))
        finally:
            await client.aclose()
        return writes

    before, marker_kept, ttl = asyncio.run(beats())
    assert before == 0 and marker_kept == 1  # the unchanged headers were not rewritten
    assert 0 < ttl <= PROVIDER_LIMITS_TTL_S

    client = redis.Redis.from_url(broker_url)
    try:
        found = read_provider_headers(client, [("edge", "gpt"), ("edge", "local")])
    finally:
        client.close()
    assert set(found) == {"edge/gpt"}
    seen = found["edge/gpt"]
    assert "authorization" not in seen.headers  # only the rate-limit headers are kept
    assert seen.updated_at is not None
    assert seen.summary() == (
        "requests 499/500 left (reset 120ms); tokens 29950/30000 left (reset 100ms)"
    )
