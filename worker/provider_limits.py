"""Publishing the rate-limit headers a provider sent each cloud backend, for ``corral nodes``.

An adapter keeps the last ``x-ratelimit-*`` / ``anthropic-ratelimit-*`` headers it saw
(``RateLimits``); the heartbeat copies them to one short-lived Redis hash per backend when they
changed, off the path of any job. They are counts and times, never a key.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis
from redis.typing import EncodableT

from broker import names
from broker.ratelimits import HEADERS_UPDATED_AT_FIELD
from worker.backends.base import Backend
from worker.backends.cloud import RateLimits

__all__ = ["PROVIDER_LIMITS_TTL_S", "publish_provider_limits"]

PROVIDER_LIMITS_TTL_S = 300
"""How long the headers stay shown after the last answer that carried them."""


async def publish_provider_limits(
    redis: Redis, node: str, backends: Mapping[str, Backend], published: dict[str, int]
) -> None:
    """Write each backend's headers that changed since the last call (``published`` keeps,
    per backend, the ``RateLimits.updates`` already written)."""
    pipe = redis.pipeline(transaction=False)
    written: dict[str, int] = {}
    for name, backend in backends.items():
        limits = getattr(backend, "rate_limits", None)
        if not isinstance(limits, RateLimits) or not limits.latest:
            continue
        if published.get(name) == limits.updates:
            continue
        key = names.provider_limits_key(node, name)
        pipe.delete(key)
        stamp = f"{limits.updated_at:.3f}"
        fields: dict[EncodableT, EncodableT] = {k: v for k, v in limits.latest.items()}
        fields[HEADERS_UPDATED_AT_FIELD] = stamp
        pipe.hset(key, mapping=fields)
        pipe.expire(key, PROVIDER_LIMITS_TTL_S)
        written[name] = limits.updates
    if written:
        await pipe.execute()
        published.update(written)
