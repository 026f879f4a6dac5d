"""A rolling update drains a worker: the stop signal of the worker's systemd unit, sent to a real
worker process while a job streams, lets that job finish on the same node; a job waiting in the
node's queue is not lost (it is served after the restart), and the next job is served.

Why it works: the unit's KillSignal is SIGTERM, Celery's warm shutdown. The worker stops
consuming, waits for the task it runs (acks late: the message is acknowledged only when the job
is done) and, with a prefetch of one, holds no other message: the queued job stays in Redis.
"""

from __future__ import annotations

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
from tests.rollout.units import WORKER_UNIT_TEMPLATE, kill_signal
from tests.support.servers import running_workers, start_worker
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


def test_the_units_stop_signal_drains_a_streaming_job_and_loses_no_queued_one(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    stop_signal = kill_signal(WORKER_UNIT_TEMPLATE.read_text())
    first, queued, after = "why drain first", "what waits in the queue", "and the next one"
    with running_workers(broker_url, tmp_path, ("alpha", SLOW), ("beta", SLOW)) as (alpha, _beta):
        streaming = client.submit(make_spec(first, node="alpha"))
        first_events = streaming.events(timeout_s=60)
        seen = read_until_deltas(first_events, 2)
        # Capacity 1: this one waits in alpha's queue behind the streaming job.
        waiting = client.submit(make_spec(queued, node="alpha"))

        alpha.process.send_signal(stop_signal)
        signalled_at = time.monotonic()
        seen += list(first_events)
        exit_code = alpha.process.wait(timeout=60)
        drained_s = time.monotonic() - signalled_at
        alpha.stop()

        # The streaming job finished where it started, without a break.
        assert exit_code == 0, alpha.log()
        assert [e.seq for e in seen] == list(range(len(seen)))
        assert not [e for e in seen if isinstance(e, InterruptedEvent | ReroutedEvent)]
        done = seen[-1]
        assert isinstance(done, DoneEvent), seen
        assert done.result.node == "alpha" and done.result.text == expected(first)
        assert drained_s < 30

        # systemd's Restart: the node comes back and serves what waited in its queue.
        restarted = start_worker(broker_url, "alpha", *SLOW, log_dir=tmp_path)
        try:
            waited = list(waiting.events(timeout_s=60))
            started = [e for e in waited if isinstance(e, StartedEvent)]
            assert started, waited
            assert isinstance(waited[-1], DoneEvent), waited
            assert waited[-1].result.text == expected(queued)

            # And the next job, sent anywhere, is served.
            nxt = list(client.stream(make_spec(after)))
            assert isinstance(nxt[-1], DoneEvent), nxt
            assert nxt[-1].result.text == expected(after)
        finally:
            restarted.stop()
