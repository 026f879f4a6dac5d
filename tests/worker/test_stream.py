"""JobStream's append: idempotent on a retry, refused to a writer that has been overtaken."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from broker import names
from broker.schemas import DeltaEvent, parse_event
from worker.stream import Fenced, JobStream, StreamScripts

JOB = "job-0123456789"


def test_a_retried_append_is_not_logged_twice() -> None:
    async def go() -> list[DeltaEvent]:
        redis = fakeredis.FakeAsyncRedis()
        scripts = StreamScripts(redis)
        first = JobStream(scripts, JOB, ttl_s=60)
        await first.delta("hello")
        # The reply to the first append was lost: the same event is sent again.
        event = parse_event((await redis.lrange(names.job_log_key(JOB), 0, 0))[0])
        again = JobStream(scripts, JOB, ttl_s=60)
        again._seq = 0
        await again._send(event)
        logged = [parse_event(r) for r in await redis.lrange(names.job_log_key(JOB), 0, -1)]
        await redis.aclose()
        return logged  # type: ignore[return-value]

    logged = asyncio.run(go())
    assert [e.text for e in logged] == ["hello"]


def test_a_writer_whose_place_was_taken_is_fenced() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        scripts = StreamScripts(redis)
        await redis.rpush(names.job_log_key(JOB), "someone else's event")
        stale = JobStream(scripts, JOB, ttl_s=60)
        try:
            await stale.delta("late")
        finally:
            await redis.aclose()

    with pytest.raises(Fenced):
        asyncio.run(go())
