"""The controller's compare-and-set writes into a job's stream, on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from broker import names
from broker.schemas import ReroutedEvent, parse_event
from controller.stream_control import CancelOutcome, StreamControl, TakeOver

JOB = "job-0123456789"


@pytest.fixture
def conn(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


def rerouted(seq: int, attempt: int = 2) -> ReroutedEvent:
    return ReroutedEvent(
        job_id=JOB,
        seq=seq,
        ts=time.time(),
        attempt=attempt,
        from_node="a",
        to_node="b",
        reason="node 'a' stopped heartbeating",
    )


def take_over(control: StreamControl, seq: int, attempt_seen: int = 1) -> TakeOver:
    return control.take_over(
        rerouted(seq),
        attempt_seen=attempt_seen,
        new_lease="2",
        old_node="a",
        refuse_if_cancelled=True,
    )


def test_moving_a_job_takes_its_lease_and_deletes_the_stale_queued_copy(
    conn: redis.Redis,
) -> None:
    control = StreamControl(conn, ttl_s=60)
    conn.lpush(names.node_queue("a"), '{"headers": {"id": "other-job"}}')
    conn.lpush(names.node_queue("a"), f'{{"headers": {{"id": "{JOB}"}}}}')
    assert take_over(control, seq=0) is TakeOver.WRITTEN
    assert conn.get(names.job_lease_key(JOB)) == b"2"
    assert conn.lrange(names.node_queue("a"), 0, -1) == [b'{"headers": {"id": "other-job"}}']
    logged = [parse_event(e) for e in conn.lrange(names.job_log_key(JOB), 0, -1)]
    assert logged == [rerouted(0).model_copy(update={"ts": logged[0].ts})]


def test_nothing_is_written_over_events_the_controller_has_not_seen(conn: redis.Redis) -> None:
    control = StreamControl(conn, ttl_s=60)
    conn.rpush(names.job_log_key(JOB), "a token the worker wrote meanwhile")
    assert take_over(control, seq=0) is TakeOver.UNSEEN_EVENTS
    assert conn.get(names.job_lease_key(JOB)) is None


def test_only_the_attempt_that_was_seen_can_be_moved(conn: redis.Redis) -> None:
    control = StreamControl(conn, ttl_s=60)
    conn.set(names.job_lease_key(JOB), "2:worker-b")  # another controller moved it already
    assert take_over(control, seq=0, attempt_seen=1) is TakeOver.LEASE_MOVED
    conn.set(names.job_lease_key(JOB), "x")  # the job is over
    assert take_over(control, seq=0, attempt_seen=2) is TakeOver.LEASE_MOVED


def test_a_cancelled_job_is_not_moved(conn: redis.Redis) -> None:
    control = StreamControl(conn, ttl_s=60)
    conn.set(names.job_cancel_key(JOB), 1)
    assert take_over(control, seq=0) is TakeOver.CANCELLED


def test_cancelling_a_queued_job_ends_its_stream_and_empties_its_place_in_the_queue(
    conn: redis.Redis,
) -> None:
    control = StreamControl(conn, ttl_s=60)
    for queue in names.node_queue_lists("a"):
        conn.lpush(queue, f'{{"headers": {{"id": "{JOB}"}}}}')
    assert control.cancel(JOB, "a") is CancelOutcome.REMOVED_FROM_QUEUE
    assert all(conn.llen(q) == 0 for q in names.node_queue_lists("a"))
    (event,) = [parse_event(e) for e in conn.lrange(names.job_log_key(JOB), 0, -1)]
    assert event.type == "error" and event.code == "cancelled" and event.final  # type: ignore[union-attr]
    assert conn.get(names.job_lease_key(JOB)) == b"x"  # no worker may start it now


def test_cancelling_a_running_job_tells_its_worker(conn: redis.Redis) -> None:
    control = StreamControl(conn, ttl_s=60)
    conn.set(names.job_lease_key(JOB), "1:worker-a")
    pubsub = conn.pubsub()
    pubsub.subscribe(names.CANCEL_CHANNEL)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    assert control.cancel(JOB, "a") is CancelOutcome.RUNNING_TOLD
    message = pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == JOB.encode()
    assert conn.llen(names.job_log_key(JOB)) == 0  # the worker writes the cancellation
    pubsub.close()
