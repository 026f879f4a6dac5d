"""The client's stream reader: every event once, in order, whatever pub/sub delivers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import fakeredis
import pytest

from broker import names
from broker.errors import JobTimeout, NodeLost
from broker.schemas import DeltaEvent, DoneEvent, JobResult, StartedEvent, Timings
from controller.reader import Event, JobStreamReader

JOB = "job-under-test"


@pytest.fixture
def redis() -> Iterator[fakeredis.FakeRedis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


def events(n_deltas: int) -> list[Event]:
    out: list[Event] = [StartedEvent(job_id=JOB, seq=0, ts=0, node="n", backend="b", model="m")]
    out += [DeltaEvent(job_id=JOB, seq=i + 1, ts=0, text=f"t{i} ") for i in range(n_deltas)]
    result = JobResult(
        job_id=JOB,
        status="ok",
        node="n",
        backend="b",
        model="m",
        text="".join(f"t{i} " for i in range(n_deltas)),
        timings=Timings(queued_ms=0, first_token_ms=0, total_ms=0),
    )
    out.append(DoneEvent(job_id=JOB, seq=n_deltas + 1, ts=0, result=result))
    return out


def write(redis: fakeredis.FakeRedis, event: Event, *, publish: bool) -> None:
    payload = event.model_dump_json()
    redis.rpush(names.job_log_key(JOB), payload)
    if publish:
        redis.publish(names.job_channel(JOB), payload)


def subscribed_reader(redis: fakeredis.FakeRedis, node: str | None = None) -> JobStreamReader:
    pubsub = redis.pubsub()
    pubsub.subscribe(names.job_channel(JOB))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    return JobStreamReader(redis, pubsub, JOB, node)


def test_missed_messages_are_refilled_from_the_log_in_order(redis: fakeredis.FakeRedis) -> None:
    reader = subscribed_reader(redis)
    stream = events(5)
    for event in stream:
        # Pub/sub drops the 2nd and 3rd delta (a reconnect, say); the log has them.
        write(redis, event, publish=event.seq not in (2, 3))
    assert list(reader.events(timeout_s=5)) == stream


def test_a_late_subscriber_gets_history_then_live_events_exactly_once(
    redis: fakeredis.FakeRedis,
) -> None:
    stream = events(4)
    for event in stream[:3]:
        write(redis, event, publish=True)  # published before this client subscribed
    reader = subscribed_reader(redis)
    # Events that are both in the log and delivered live must not be yielded twice.
    for event in stream[3:]:
        write(redis, event, publish=True)
    got = list(reader.events(timeout_s=5))
    assert got == stream
    assert [e.seq for e in got] == sorted({e.seq for e in got})


def test_a_lost_final_event_is_found_in_the_log(redis: fakeredis.FakeRedis) -> None:
    reader = subscribed_reader(redis)
    stream = events(2)
    for event in stream:
        write(redis, event, publish=not isinstance(event, DoneEvent))
    started = time.monotonic()
    assert list(reader.events(timeout_s=10)) == stream
    assert time.monotonic() - started < 3  # found at the next idle check, not at the timeout


def test_a_node_that_stops_heartbeating_ends_the_wait(redis: fakeredis.FakeRedis) -> None:
    redis.set(names.node_alive_key("n"), "w1", px=300)
    reader = subscribed_reader(redis, node="n")
    reader.lost_grace_s = 0.5
    write(redis, events(1)[0], publish=True)
    with pytest.raises(NodeLost, match="node 'n' stopped heartbeating"):
        list(reader.events(timeout_s=30))


def test_a_restarted_worker_is_a_lost_one_for_the_job_it_was_running(
    redis: fakeredis.FakeRedis,
) -> None:
    redis.set(names.node_alive_key("n"), "new-instance")
    reader = subscribed_reader(redis, node="n")
    reader.lost_grace_s = 0.5
    started = events(1)[0].model_copy(update={"instance": "old-instance"})
    write(redis, started, publish=True)
    with pytest.raises(NodeLost, match="the worker on node 'n' restarted"):
        list(reader.events(timeout_s=30))


def test_silence_ends_in_a_timeout(redis: fakeredis.FakeRedis) -> None:
    reader = subscribed_reader(redis)
    with pytest.raises(JobTimeout, match="no event from job"):
        list(reader.events(timeout_s=1))
