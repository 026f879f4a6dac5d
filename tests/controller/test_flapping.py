"""Redis flapping: restarted three times in a minute while 20 answers stream.

Every job must end (done, interrupted or a final error, with the reason), none may hang or
stream a token twice, and no worker may need a restart. With AOF the jobs' state survives each
restart; without it the state is wiped, and a job whose state was lost must say so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import CorralError, JobStateLost, JobTimeout
from broker.schemas import AnyStreamEvent, DeltaEvent, DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.controller.test_failover import expected, sim
from tests.support.servers import RedisServer, running_workers, start_redis

JOBS = 20
RESTARTS = 3
JOB_TIMEOUT_S = 45  # well past the last restart: a job still silent then has hung


class Outcome:
    def __init__(self) -> None:
        self.events: list[AnyStreamEvent] = []
        self.error: CorralError | None = None


def follow(client: CorralClient, prompt: str, outcome: Outcome) -> None:
    try:
        run = client.submit(make_spec(prompt))
        for event in run.events(timeout_s=JOB_TIMEOUT_S):
            outcome.events.append(event)
    except CorralError as exc:
        outcome.error = exc


@pytest.fixture(params=[True, False], ids=["aof", "no-aof"])
def flapping_redis(request: pytest.FixtureRequest) -> Iterator[tuple[RedisServer, bool]]:
    server = start_redis(appendonly=request.param)
    yield server, request.param
    server.stop()


def test_every_job_ends_with_a_reason_when_redis_restarts_three_times(
    flapping_redis: tuple[RedisServer, bool], tmp_path: Path
) -> None:
    server, persistent = flapping_redis
    specs = [("a", sim("--sim-token-ms", "120", "--capacity", "4"))]
    specs.append(("b", sim("--sim-token-ms", "120", "--capacity", "4")))
    with (
        running_workers(server.url, tmp_path, *specs) as workers,
        CorralClient(build_settings(broker_url=server.url)) as client,
    ):
        outcomes = [Outcome() for _ in range(JOBS)]
        threads = [
            threading.Thread(target=follow, args=(client, f"story {i}", o), daemon=True)
            for i, o in enumerate(outcomes)
        ]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for _ in range(RESTARTS):
            time.sleep(2.5)
            server.halt()
            time.sleep(1.0)
            server.resume()
        for t in threads:
            t.join(JOB_TIMEOUT_S + 15)
        hung = [i for i, t in enumerate(threads) if t.is_alive()]
        assert hung == [], f"jobs {hung} never ended"
        assert all(w.process.poll() is None for w in workers), "a worker died"

        after = list(client.stream(make_spec("and after the storm")))
        assert isinstance(after[-1], DoneEvent)

    lost = [o for o in outcomes if isinstance(o.error, JobStateLost)]
    if persistent:
        assert lost == [], "with AOF no job's state may be lost"
    else:
        # The first restart wipes the jobs then streaming: each says so, none waits it out.
        assert lost, "no job was told its state was lost"
        assert all("send it again" in str(o.error) for o in lost)
    for i, outcome in enumerate(outcomes):
        seqs = [e.seq for e in outcome.events]
        assert seqs == list(range(len(seqs))), f"job {i}: events out of order or twice: {seqs}"
        if outcome.error is not None:
            # Waiting out the timeout is how a job vanishes silently: it must be told sooner.
            assert not isinstance(outcome.error, JobTimeout), f"job {i}: {outcome.error}"
            assert str(outcome.error), f"job {i} failed without a reason"
            continue
        last = outcome.events[-1]
        assert last.type in ("done", "interrupted", "error"), f"job {i} ended on {last.type}"
        if isinstance(last, DoneEvent):
            text = "".join(e.text for e in outcome.events if isinstance(e, DeltaEvent))
            assert last.result.text == text == expected(f"story {i}")
