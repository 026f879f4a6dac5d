"""A rolling update drains a worker: the stop signal of the worker's systemd unit, sent to a real
worker process while jobs stream, lets those jobs finish on the same node; a job waiting in the
node's queue is not lost (it moves to another node, or the restarted worker serves it), and the
next job is served.

Why it works: the unit's KillSignal is SIGTERM, Celery's warm shutdown. The worker stops
consuming and waits for the tasks it runs (acks late: a message is acknowledged only when its
job is done). With a prefetch multiplier of 1 and acks late, the worker reserves no message
beyond the ones it runs, so nothing it merely prefetched is held: waiting jobs stay in Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    InterruptedEvent,
    ReroutedEvent,
    StartedEvent,
)
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.jobrun import JobRun
from tests.rollout.units import WORKER_UNIT_TEMPLATE, kill_signal
from tests.support.servers import WorkerProcess, running_workers, start_worker
from worker.backends.simulated import reply_for

# About 20 words a reply at 80 ms a word: a job streams for about 1.6 s.
SLOW = ["--simulate", "--sim-first-token-ms", "50", "--sim-token-ms", "80"]


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture
def client(broker_url: str) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=broker_url)) as c:
        yield c


def read_until_deltas(events: Iterator[AnyStreamEvent], deltas: int) -> list[AnyStreamEvent]:
    seen: list[AnyStreamEvent] = []
    for event in events:
        seen.append(event)
        if sum(isinstance(e, DeltaEvent) for e in seen) == deltas:
            return seen
    raise AssertionError(f"stream ended before {deltas} deltas: {seen}")


def stop_as_the_unit_does(worker: WorkerProcess) -> tuple[int, float]:
    """Send the unit's KillSignal; returns the exit code and how long the drain took."""
    worker.process.send_signal(kill_signal(WORKER_UNIT_TEMPLATE.read_text()))
    signalled_at = time.monotonic()
    code = worker.process.wait(timeout=60)
    drained_s = time.monotonic() - signalled_at
    worker.stop()
    return code, drained_s


def assert_finished_where_it_started(events: list[AnyStreamEvent], node: str, prompt: str) -> None:
    assert [e.seq for e in events] == list(range(len(events)))
    assert not [e for e in events if isinstance(e, InterruptedEvent | ReroutedEvent)], events
    done = events[-1]
    assert isinstance(done, DoneEvent), events
    assert done.result.node == node and done.result.text == expected(prompt)


class Follower(threading.Thread):
    """Follows a job as `corral ask` does, all the time (moves on failure included)."""

    def __init__(self, run: JobRun) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.events: list[AnyStreamEvent] = []

    def run(self) -> None:
        self.events.extend(self.run_.events(timeout_s=60))


def test_the_units_stop_signal_drains_a_streaming_job_and_a_queued_job_moves(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    first, busy, queued, after = "why drain first", "beta is busy", "what waits", "the next"
    with running_workers(broker_url, tmp_path, ("alpha", SLOW), ("beta", SLOW)) as (alpha, _):
        streaming = client.submit(make_spec(first, node="alpha"))
        first_events = streaming.events(timeout_s=60)
        seen = read_until_deltas(first_events, 2)
        beta_busy = Follower(client.submit(make_spec(busy, node="beta")))
        beta_busy.start()
        # Both nodes are full (capacity 1): this one waits in a node's queue (alpha, by name).
        waiting = client.submit(make_spec(queued))
        assert waiting.candidate.node == "alpha"
        follower = Follower(waiting)
        follower.start()

        code, drained_s = stop_as_the_unit_does(alpha)
        seen += list(first_events)
        assert code == 0, alpha.log()
        assert drained_s < 30
        assert_finished_where_it_started(seen, "alpha", first)

        # The waiting job was in Redis, not in the stopped worker: it moves to beta.
        follower.join(timeout=60)
        moved = follower.events
        assert isinstance(moved[-1], DoneEvent), moved
        assert moved[-1].result.node == "beta" and moved[-1].result.text == expected(queued)
        assert [e.to_node for e in moved if isinstance(e, ReroutedEvent)] == ["beta"]
        beta_busy.join(timeout=60)
        assert_finished_where_it_started(beta_busy.events, "beta", busy)

        # systemd's Restart: the node comes back, and the next job is served.
        restarted = start_worker(broker_url, "alpha", *SLOW, log_dir=tmp_path)
        try:
            nxt = list(client.stream(make_spec(after, node="alpha")))
            assert isinstance(nxt[-1], DoneEvent), nxt
            assert nxt[-1].result.node == "alpha" and nxt[-1].result.text == expected(after)
        finally:
            restarted.stop()


def test_a_queued_message_stays_in_redis_for_the_restarted_worker(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """Warm shutdown with acks late and prefetch 1: the worker holds no message it has not
    started, so a job pinned to the node survives the restart and is served by it."""
    with running_workers(broker_url, tmp_path, ("alpha", SLOW)) as (alpha,):
        streaming = client.submit(make_spec("first", node="alpha"))
        first_events = streaming.events(timeout_s=60)
        seen = read_until_deltas(first_events, 1)
        waiting = client.submit(make_spec("pinned and waiting", node="alpha"))
        code, _ = stop_as_the_unit_does(alpha)
        seen += list(first_events)
        assert code == 0, alpha.log()
        assert_finished_where_it_started(seen, "alpha", "first")

        restarted = start_worker(broker_url, "alpha", *SLOW, log_dir=tmp_path)
        try:
            # Followed only now (nobody watched during the restart; see the README's limits).
            waited = list(waiting.events(timeout_s=60))
        finally:
            restarted.stop()
    assert [e.node for e in waited if isinstance(e, StartedEvent)] == ["alpha"]
    assert_finished_where_it_started(waited, "alpha", "pinned and waiting")


def test_a_thread_pool_worker_drains_every_job_it_runs(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    prompts = ["one of two", "two of two"]
    with running_workers(broker_url, tmp_path, ("wide", [*SLOW, "--capacity", "2"])) as (wide,):
        runs = [client.submit(make_spec(p, node="wide")) for p in prompts]
        streams = [run.events(timeout_s=60) for run in runs]
        seen = [read_until_deltas(events, 1) for events in streams]
        code, _ = stop_as_the_unit_does(wide)
        for events, more in zip(seen, streams, strict=True):
            events += list(more)
    assert code == 0
    for events, prompt in zip(seen, prompts, strict=True):
        assert_finished_where_it_started(events, "wide", prompt)


def test_a_pinned_job_followed_through_the_restart_is_served_by_the_restarted_worker(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """A worker that stops with jobs waiting for it does not mark its node down (it would fail
    a job pinned to it in the second before the restart): the restarted worker's new instance
    moves the job on, back to the same node."""
    with running_workers(broker_url, tmp_path, ("alpha", SLOW)) as (alpha,):
        streaming = client.submit(make_spec("first", node="alpha"))
        read_until_deltas(streaming.events(timeout_s=60), 1)
        follower = Follower(client.submit(make_spec("pinned, followed", node="alpha")))
        follower.start()
        code, _ = stop_as_the_unit_does(alpha)
        assert code == 0
        # systemd restarts it at once (Restart=, or the handler's systemctl restart).
        restarted = start_worker(broker_url, "alpha", *SLOW, log_dir=tmp_path)
        try:
            follower.join(timeout=60)
        finally:
            restarted.stop()
    waited = follower.events
    assert isinstance(waited[-1], DoneEvent), waited
    assert waited[-1].result.node == "alpha"
    assert waited[-1].result.text == expected("pinned, followed")
    assert [(e.from_node, e.to_node) for e in waited if isinstance(e, ReroutedEvent)] in (
        [],
        [("alpha", "alpha")],
    )
