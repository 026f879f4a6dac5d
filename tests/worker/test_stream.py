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


def test_a_job_cancelled_while_an_append_is_in_flight_still_ends_its_stream() -> None:
    """A cancel that lands after Redis ran the append but before its reply came back: the
    stream's next event (the cancellation) must still get the next place in the log."""

    async def go() -> list[str]:
        redis = fakeredis.FakeAsyncRedis()
        scripts = StreamScripts(redis)
        real_append = scripts.append
        reply_on_its_way = asyncio.Event()

        async def append_with_a_slow_reply(**kwargs: object) -> object:
            written = await real_append(**kwargs)  # type: ignore[arg-type]
            reply_on_its_way.set()
            await asyncio.sleep(0.05)
            return written

        stream = JobStream(scripts, JOB, ttl_s=60)
        stream._append = append_with_a_slow_reply  # type: ignore[assignment]
        writing = asyncio.create_task(stream.delta("hello"))
        await reply_on_its_way.wait()
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        stream._append = real_append
        await stream.error("cancelled", "job cancelled", "alpha", None)
        logged = [parse_event(r) for r in await redis.lrange(names.job_log_key(JOB), 0, -1)]
        await redis.aclose()
        return [e.type for e in logged]

    assert asyncio.run(go()) == ["delta", "error"]
