"""JobStream's append: idempotent on a retry, refused to a writer that has been overtaken."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis.exceptions as redis_exceptions

from broker import names
from broker.schemas import DeltaEvent, parse_event
from worker.stream import Claim, Fenced, JobStream, StreamScripts

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


def test_a_claim_whose_reply_was_lost_is_sent_again_and_starts_once() -> None:
    """Redis ran the claim but the connection dropped before its reply (a restart): the claim
    is sent again on a fresh connection. It must find its own lease and start the job, with
    one started event; another delivery of the same attempt must still be refused."""

    async def go() -> tuple[Claim, Claim, list[bytes]]:
        redis = fakeredis.FakeAsyncRedis()
        scripts = StreamScripts(redis)
        real_claim = scripts.claim
        calls = 0

        async def reply_lost_once(**kwargs: object) -> object:
            nonlocal calls
            calls += 1
            answer = await real_claim(**kwargs)  # type: ignore[arg-type]
            if calls == 1:
                raise redis_exceptions.ConnectionError("Connection closed by server.")
            return answer

        scripts.claim = reply_lost_once  # type: ignore[method-assign]
        first = JobStream(scripts, JOB, ttl_s=60)
        again = JobStream(StreamScripts(redis), JOB, ttl_s=60)
        args = {"node": "n1", "backend": "b", "model": "m", "lease_ttl_s": 60}
        try:
            started = await first.claim(attempt=1, claimer="w1", **args)  # type: ignore[arg-type]
            await first.delta("hello")  # it owns the stream: its first token goes after started
            copy = await again.claim(attempt=1, claimer="w1", **args)  # type: ignore[arg-type]
            return started, copy, await redis.lrange(names.job_log_key(JOB), 0, -1)
        finally:
            await redis.aclose()

    started, copy, logged = asyncio.run(go())
    assert started is Claim.STARTED
    assert copy is Claim.TAKEN_ELSEWHERE  # a redelivered copy, even in the same worker
    events = [parse_event(raw) for raw in logged]
    assert [e.type for e in events] == ["started", "delta"]
    assert [e.seq for e in events] == [0, 1]
