"""The reader's core without Redis: what to yield or refill, when the job or its node ended."""

from __future__ import annotations

import pytest

from broker.errors import JobTimeout
from broker.schemas import (
    DeltaEvent,
    DoneEvent,
    JobResult,
    ReroutedEvent,
    StartedEvent,
    Timings,
)
from controller.stream_core import IDLE_CHECK_S, Event, IdleStep, LogRange, StreamCursor

JOB = "job-core"


def stream(n_deltas: int) -> list[Event]:
    out: list[Event] = [
        StartedEvent(job_id=JOB, seq=0, ts=0, node="a", backend="b", model="m", instance="w1")
    ]
    out += [DeltaEvent(job_id=JOB, seq=i + 1, ts=0, text=f"t{i}") for i in range(n_deltas)]
    result = JobResult(
        job_id=JOB,
        status="ok",
        node="a",
        backend="b",
        model="m",
        text="".join(f"t{i}" for i in range(n_deltas)),
        timings=Timings(queued_ms=0, first_token_ms=0, total_ms=0),
    )
    out.append(DoneEvent(job_id=JOB, seq=n_deltas + 1, ts=0, result=result))
    return out


def raw(event: Event) -> bytes:
    return event.model_dump_json().encode()


def test_live_events_in_order_are_yielded_and_the_end_is_seen() -> None:
    cursor = StreamCursor(JOB, node="a")
    events = stream(2)
    got = []
    for event in events:
        live = cursor.from_live(raw(event))
        accepted = cursor.accept(live)
        assert live.refill is None and accepted is not None
        got.append(cursor.take(accepted))
    assert got == events
    assert cursor.finished and cursor.next_seq == len(events)


def test_a_gap_asks_for_exactly_the_missing_range_of_the_log() -> None:
    cursor = StreamCursor(JOB, node="a")
    events = stream(5)
    cursor.take(cursor.from_live(raw(events[0])).event)  # type: ignore[arg-type]
    live = cursor.from_live(raw(events[4]))  # 1..3 were lost on pub/sub
    assert live.refill == LogRange(1, 3)
    refilled = list(cursor.from_log([raw(e) for e in events[1:4]]))
    assert refilled == events[1:4]
    accepted = cursor.accept(live)
    assert accepted is not None and cursor.take(accepted) == events[4]


def test_a_gap_the_log_could_not_fill_keeps_the_live_event_back_until_it_can() -> None:
    cursor = StreamCursor(JOB, node="a")
    events = stream(5)
    list(cursor.from_log([raw(e) for e in events[:4]]))
    live = cursor.from_live(raw(events[5]))  # 4 was missed, and Redis fails the refill
    assert live.refill == LogRange(4, 4)
    assert cursor.accept(live) is None  # not yielded ahead of 4
    assert list(cursor.from_log([raw(e) for e in events[4:]])) == events[4:]


def test_duplicates_and_garbage_on_pub_sub_are_dropped() -> None:
    cursor = StreamCursor(JOB, node="a")
    events = stream(1)
    list(cursor.from_log([raw(events[0]), raw(events[1])]))  # history read from the log
    assert cursor.from_live(raw(events[1])).event is None  # the same delta, live: not twice
    assert cursor.from_live(b"{not json").event is None
    assert cursor.log_range() == LogRange(2, -1)


def test_a_log_read_stops_at_the_terminal_event() -> None:
    cursor = StreamCursor(JOB, node="a")
    events = stream(1)
    stray = DeltaEvent(job_id=JOB, seq=len(events), ts=0, text="after the end")
    assert list(cursor.from_log([raw(e) for e in [*events, stray]])) == events


def test_started_and_rerouted_events_say_where_the_job_is() -> None:
    cursor = StreamCursor(JOB, node="a")
    cursor.take(stream(0)[0])
    assert (cursor.node, cursor.instance) == ("a", "w1")
    moved = ReroutedEvent(
        job_id=JOB, seq=1, ts=0, attempt=2, from_node="a", to_node="b", reason="x"
    )
    cursor.take(moved)
    assert (cursor.node, cursor.instance) == ("b", None)


def test_silence_times_out_only_after_the_timeout_and_progress_resets_it() -> None:
    cursor = StreamCursor(JOB, node="a")
    cursor.start_clock(now=100.0, timeout_s=10)
    assert cursor.wait_s(100.0) == IDLE_CHECK_S
    assert cursor.after_idle(105.0, seq_before=0) is IdleStep.CHECK_WORKER
    cursor.take(stream(0)[0])
    assert cursor.after_idle(109.0, seq_before=0) is IdleStep.WAIT  # the log had something
    assert cursor.after_idle(118.0, seq_before=1) is IdleStep.CHECK_WORKER
    with pytest.raises(JobTimeout, match="no event from job job-core for 10s"):
        cursor.after_idle(119.5, seq_before=1)


def test_a_missing_or_changed_liveness_key_means_the_worker_is_gone() -> None:
    cursor = StreamCursor(JOB, node="a")
    cursor.take(stream(0)[0])  # started on instance w1
    assert cursor.lost_reason(b"w1") is None
    assert cursor.lost_reason(None) == "node 'a' stopped heartbeating"
    reason = cursor.lost_reason(b"w2")
    assert reason is not None and "restarted" in reason


def test_without_an_owner_the_loss_is_raised_after_the_grace_period() -> None:
    cursor = StreamCursor(JOB, node="a", lost_grace_s=2.0)
    assert cursor.give_up("gone", now=10.0) is None
    assert cursor.give_up("gone", now=11.0) is None
    error = cursor.give_up("gone", now=12.0)
    assert error is not None and "gone while job job-core was on it" in str(error)


def test_liveness_is_not_judged_right_after_redis_comes_back() -> None:
    cursor = StreamCursor(JOB, node="a")
    assert cursor.worker_check_due(now=50.0)
    cursor.redis_unreachable(now=50.0)
    assert not cursor.worker_check_due(now=52.0)
    assert cursor.worker_check_due(now=56.0)
    assert not StreamCursor(JOB, node=None).worker_check_due(now=0.0)  # nowhere to check yet


def test_a_job_whose_state_redis_lost_is_told_so_not_left_to_time_out() -> None:
    cursor = StreamCursor("job-lost-1", "a", has_record=True)
    assert cursor.state_lost(log_length=0, record=b"a") is None  # queued, record in place
    cursor.next_seq = 3  # three events read so far
    assert cursor.state_lost(log_length=3, record=b"a") is None
    wiped_log = cursor.state_lost(log_length=0, record=b"a")
    assert wiped_log is not None and "send it again" in str(wiped_log)
    assert cursor.state_lost(log_length=3, record=None) is not None  # record gone
    # A model operation's stream has no record to lose; only its log counts.
    op = StreamCursor("op-1", "a")
    assert op.state_lost(log_length=0, record=None) is None
