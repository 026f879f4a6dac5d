"""JobStream's append: idempotent on a retry, refused to a writer that has been overtaken,
and several events ready together written by one script call, each still its own message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence

import fakeredis
import pytest
import redis
import redis.asyncio
import redis.exceptions as redis_exceptions

from broker import names
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    JobAssignment,
    JobResult,
    JobSpec,
    StartedEvent,
    Timings,
    parse_event,
)
from tests.support.servers import RedisServer, start_redis
from worker.backends.base import Chunk
from worker.jobs import JobControl, run_job
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


def _result(text: str) -> JobResult:
    timings = Timings(queued_ms=0, first_token_ms=1, total_ms=1)
    return JobResult(
        job_id=JOB, status="ok", node="n1", backend="b", model="m", text=text, timings=timings
    )


def test_a_batch_whose_reply_was_lost_is_sent_again_and_written_once() -> None:
    """A token and the done queued together go out in one call; Redis ran it but the reply
    was lost: the same batch sent again must not write it twice."""

    async def go() -> tuple[list[bytes], bytes | None, int]:
        redis_ = fakeredis.FakeAsyncRedis()
        scripts = StreamScripts(redis_)
        real_append = scripts.append
        calls = 0

        async def reply_lost_once(**kwargs: object) -> object:
            nonlocal calls
            calls += 1
            answer = await real_append(**kwargs)  # type: ignore[arg-type]
            if calls == 1:
                raise redis_exceptions.ConnectionError("Connection closed by server.")
            return answer

        scripts.append = reply_lost_once  # type: ignore[method-assign]
        stream = JobStream(scripts, JOB, ttl_s=60)
        try:
            await stream.delta("hello", wait=False)
            await stream.done(_result("hello"))
            logged = await redis_.lrange(names.job_log_key(JOB), 0, -1)
            return logged, await redis_.get(names.job_result_key(JOB)), calls
        finally:
            await redis_.aclose()

    logged, stored, calls = asyncio.run(go())
    assert calls == 2  # one batch, sent twice
    events = [parse_event(raw) for raw in logged]
    assert [e.type for e in events] == ["delta", "done"]
    assert [e.seq for e in events] == [0, 1]
    assert stored is not None and JobResult.model_validate_json(stored).text == "hello"


def test_a_queued_token_of_a_writer_whose_place_was_taken_raises_at_the_next_event() -> None:
    async def go() -> list[bytes]:
        redis_ = fakeredis.FakeAsyncRedis()
        await redis_.rpush(names.job_log_key(JOB), "someone else's event")
        stale = JobStream(StreamScripts(redis_), JOB, ttl_s=60)
        try:
            await stale.delta("late", wait=False)  # queued: the refusal comes later
            with pytest.raises(Fenced):
                await stale.done(_result("late"))
            return await redis_.lrange(names.job_log_key(JOB), 0, -1)
        finally:
            await redis_.aclose()

    assert asyncio.run(go()) == [b"someone else's event"]


# --- on a real redis-server: what reaches a subscriber, and how many script calls it took ----


class Backend:
    """Yields ``texts`` as chunks; ``pause`` between them: None (all ready at once), 0 (one
    loop turn each, a fast stream) or seconds. ``hang`` waits forever after the last one."""

    name = "b"
    kind = "ollama"
    url = None
    capacity = 1

    def __init__(self, texts: Sequence[str], *, pause: float | None, hang: bool = False):
        self.texts, self.pause, self.hang = list(texts), pause, hang

    async def stream_chat(
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        await asyncio.sleep(0)
        for index, text in enumerate(self.texts):
            if index and self.pause is not None:
                await asyncio.sleep(self.pause)
            yield Chunk(text=text)
        if self.hang:
            await asyncio.Event().wait()
        yield Chunk(text="", done=True, finish_reason="stop", completion_tokens=len(self.texts))


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A server of this module's own: its command counts are these tests' alone."""
    server = start_redis()
    yield server
    server.stop()


def script_calls(server: RedisServer) -> int:
    client = server.client()
    try:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        client.close()


async def next_message(pubsub: redis.asyncio.client.PubSub, what: str) -> AnyStreamEvent:
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        # None also for the subscription's confirmation, which is skipped.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is not None:
            return parse_event(message["data"])
    raise TimeoutError(f"no message within 5 s: {what}")


async def run_followed(
    server: RedisServer, backend: Backend, *, cancel_when_first_token_arrives: bool = False
) -> tuple[list[AnyStreamEvent], list[AnyStreamEvent]]:
    """Run a job on ``backend`` while a subscriber follows its channel, as a client does;
    return the events the subscriber got (one per message) and the replay log."""
    client = redis.asyncio.Redis.from_url(server.url)
    await client.flushdb()
    scripts = StreamScripts(client)
    await scripts.preload()
    pubsub = client.pubsub()
    await pubsub.subscribe(names.job_channel(JOB))
    await client.config_resetstat()
    spec = JobSpec(job_id=JOB, messages=(ChatMessage(role="user", content="hi"),), created_at=0)
    control = JobControl(JobAssignment(spec=spec, node="n1", backend="b", model="m"))
    stream = JobStream(scripts, JOB, ttl_s=60)
    claim = stream.claim(attempt=1, claimer="w1", node="n1", backend="b", model="m", lease_ttl_s=60)
    job = asyncio.create_task(
        run_job(control, {"b": backend}, stream, claim, first_token_timeout_s=5)  # type: ignore[dict-item]
    )
    control.task = job
    received: list[AnyStreamEvent] = []
    try:
        while not received or received[-1].type not in ("done", "error", "interrupted"):
            received.append(await next_message(pubsub, f"the event after {received}"))
            if cancel_when_first_token_arrives and received[-1].type == "delta":
                control.cancel_requested = True
                job.cancel()
        await job
        logged = [parse_event(raw) for raw in await client.lrange(names.job_log_key(JOB), 0, -1)]
        return received, logged
    finally:
        await pubsub.aclose()
        await client.aclose()


def test_an_instant_backends_token_and_done_go_out_in_one_script_call(
    own_redis: RedisServer,
) -> None:
    received, logged = asyncio.run(run_followed(own_redis, Backend(["Hello"], pause=None)))
    # The claim with its started event, then the token and the done together (three before).
    assert script_calls(own_redis) == 2
    assert [type(e) for e in received] == [StartedEvent, DeltaEvent, DoneEvent]
    assert [e.seq for e in received] == [0, 1, 2]
    assert received == logged
    done = received[-1]
    assert isinstance(done, DoneEvent) and done.result.text == "Hello"


def test_tokens_ready_at_once_go_out_together_each_its_own_message(
    own_redis: RedisServer,
) -> None:
    texts = [f" t{i}" for i in range(40)]
    received, logged = asyncio.run(run_followed(own_redis, Backend(texts, pause=None)))
    assert script_calls(own_redis) == 2
    assert [e.seq for e in received] == list(range(42))
    assert [e.text for e in received if isinstance(e, DeltaEvent)] == texts
    assert received == logged


def test_tokens_arriving_while_a_write_is_in_flight_go_out_in_the_next_call(
    own_redis: RedisServer,
) -> None:
    texts = [f" t{i}" for i in range(40)]
    received, logged = asyncio.run(run_followed(own_redis, Backend(texts, pause=0)))
    calls = script_calls(own_redis)
    assert calls < 1 + len(texts) + 1, calls  # fewer calls than events
    assert [e.seq for e in received] == list(range(42))
    assert [e.text for e in received if isinstance(e, DeltaEvent)] == texts
    assert received == logged


def test_a_token_that_is_alone_goes_out_without_waiting_for_the_next(
    own_redis: RedisServer,
) -> None:
    """The backend goes quiet after its first token: the subscriber has the token while the
    backend still waits (it is not held back for company), and a cancel then ends the stream."""
    received, logged = asyncio.run(
        run_followed(
            own_redis, Backend(["Hel"], pause=None, hang=True), cancel_when_first_token_arrives=True
        )
    )
    assert [e.type for e in received] == ["started", "delta", "error"]
    error = received[-1]
    assert isinstance(error, ErrorEvent) and error.code == "cancelled"
    assert [e.seq for e in logged] == [0, 1, 2]
    assert received == logged
