"""Adding a finished job's tokens and cost to the cluster's per-day usage counters."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker import names
from broker.schemas import JobResult
from broker.usage import increments, usage_day

__all__ = ["record_usage"]

log = logging.getLogger(__name__)


async def record_usage(redis: Redis, result: JobResult, route: str | None, now: float) -> None:
    """Count ``result`` in the hash of the UTC day ``now`` falls in.

    A Redis failure loses this job's count, with a warning, and nothing else: the answer has
    already been delivered."""
    key = names.usage_day_key(usage_day(now))
    counts, costs = increments(result, route)
    pipe = redis.pipeline(transaction=True)
    for field, amount in counts.items():
        pipe.hincrby(key, field, amount)
    for field, cost in costs.items():
        pipe.hincrbyfloat(key, field, cost)
    pipe.expire(key, names.USAGE_TTL_S)
    try:
        await pipe.execute()
    except RedisError as exc:
        log.warning("job %s: usage not counted (%s)", result.job_id, exc.__class__.__name__)
