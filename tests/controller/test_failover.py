"""Failures, end to end: real worker processes on a real redis-server, killed, frozen, cut off.

Each test starts its own workers on a fresh Redis database and checks what the user would:
which node served the job, that no token arrived twice or out of order, what the stream said
when a node died, and how long corral took to notice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import names
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    ReroutedEvent,
    StartedEvent,
)
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.reader import IDLE_CHECK_S
from tests.fakes.fake_ollama import running_fake_ollama
from tests.fakes.fake_openai import running_fake_openai
from tests.support.servers import (
    REPO_ROOT,
    running_workers,
    start_redis,
    start_worker,
    supervised_workers,
    wait_until,
)
from worker.backends.simulated import reply_for

HEARTBEAT_S = 0.5
# A dead node is noticed once its liveness key expires (3 heartbeats) and the follower's next
# idle check runs; the slack covers a loaded CI machine.
DETECTION_BOUND_S = 3 * HEARTBEAT_S + IDLE_CHECK_S + 1.5


def sim(*extra: str) -> list[str]:
    return ["--simulate", "--tags", "chat", *extra]


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture
def client(broker_url: str) -> Iterator[CorralClient]:
    settings = build_settings(broker_url=broker_url, breaker_cooldown_s=1.0)
    with CorralClient(settings) as c:
        yield c


def until(events: Iterator[AnyStreamEvent], deltas: int) -> list[AnyStreamEvent]:
    """Events up to and including the ``deltas``-th delta."""
    seen: list[AnyStreamEvent] = []
    for event in events:
        seen.append(event)
        if sum(isinstance(e, DeltaEvent) for e in seen) == deltas:
            return seen
    raise AssertionError(f"stream ended before {deltas} deltas: {seen}")


def of_type(events: list[AnyStreamEvent], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind)]


def assert_in_order_once(events: list[AnyStreamEvent]) -> None:
    assert [e.seq for e in events] == list(range(len(events)))


# --- a node dies -----------------------------------------------------------------------------


def test_a_node_killed_before_its_first_token_hands_the_job_to_the_next(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "60000")), ("b", sim())
    ) as (a, _b):
        run = client.submit(make_spec("hello there"))
        assert run.candidate.node == "a"  # equal nodes: the name breaks the tie
        events = run.events(timeout_s=30)
        seen = [next(events)]
        assert isinstance(seen[0], StartedEvent) and seen[0].node == "a"
        a.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        for event in events:
            seen.append(event)
            if isinstance(event, ReroutedEvent):
                noticed_after = time.monotonic() - killed_at
        seen += list(events)

    assert_in_order_once(seen)
    rerouted = of_type(seen, ReroutedEvent)
    assert len(rerouted) == 1
    assert (rerouted[0].from_node, rerouted[0].to_node, rerouted[0].attempt) == ("a", "b", 2)
    assert "node 'a' stopped heartbeating" in rerouted[0].reason
    assert noticed_after < DETECTION_BOUND_S
    assert [(s.node, s.attempt) for s in of_type(seen, StartedEvent)] == [("a", 1), ("b", 2)]
    assert not of_type(seen, InterruptedEvent) and not of_type(seen, ErrorEvent)
    done = seen[-1]
    assert isinstance(done, DoneEvent)
    assert done.result.node == "b" and done.result.text == expected("hello there")


def test_a_node_killed_mid_stream_ends_the_job_with_the_partial_text(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-token-ms", "200")), ("b", sim())
    ) as (a, _b):
        run = client.submit(make_spec("tell me a story"))
        events = run.events(timeout_s=30)
        seen = until(events, 3)
        a.stop(signal.SIGKILL)
        seen += list(events)

    assert_in_order_once(seen)
    interrupted = seen[-1]
    assert isinstance(interrupted, InterruptedEvent) and interrupted.final
    assert interrupted.code == "node_lost" and interrupted.node == "a"
    partial = "".join(e.text for e in of_type(seen, DeltaEvent))
    assert interrupted.partial_text == partial
    assert expected("tell me a story").startswith(partial)
    assert not of_type(seen, ReroutedEvent)  # not restarted without --retry-partial


def test_retry_partial_restarts_an_interrupted_job_on_another_node(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-token-ms", "200")), ("b", sim())
    ) as (a, _b):
        run = client.submit(make_spec("tell me a story", retry_partial=True))
        events = run.events(timeout_s=30)
        seen = until(events, 2)
        a.stop(signal.SIGKILL)
        seen += list(events)

    assert_in_order_once(seen)
    kinds = [e.type for e in seen]
    cut = kinds.index("interrupted")
    assert kinds[cut : cut + 3] == ["interrupted", "rerouted", "started"]
    assert not seen[cut].final  # type: ignore[union-attr]
    restarted = seen[cut + 3 :]
    done = restarted[-1]
    assert isinstance(done, DoneEvent) and done.result.node == "b"
    assert "".join(e.text for e in of_type(restarted, DeltaEvent)) == expected("tell me a story")


def test_a_frozen_node_loses_its_job_and_never_streams_it_after_waking(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """SIGSTOP stops the heartbeat with the process still there: when it wakes, the job has
    moved on and the stale worker must not add a single token."""
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "2000")), ("b", sim())
    ) as (a, _b):
        run = client.submit(make_spec("are you there"))
        events = run.events(timeout_s=30)
        first = next(events)
        assert isinstance(first, StartedEvent) and first.node == "a"
        a.freeze()
        seen = [first, *events]
        a.thaw()
        wait_until(lambda: "moved to another node" in a.log(), 10, "a to notice it lost the job")
        log_length = client.redis.llen(names.job_log_key(run.job_id))

    assert_in_order_once(seen)
    assert log_length == len(seen)  # a wrote nothing after waking
    done = seen[-1]
    assert isinstance(done, DoneEvent) and done.result.node == "b"
    assert done.result.text == expected("are you there")


def test_jobs_queued_on_a_dead_node_move_within_the_stated_bound(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--capacity", "1", "--sim-token-ms", "300"))
    ) as (a,):
        running = client.submit(make_spec("first in line"))
        queued = client.submit(make_spec("second in line"))
        assert queued.candidate.node == "a"
        running_events = running.events(timeout_s=30)
        until(running_events, 1)
        b = start_worker(broker_url, "b", *sim(), log_dir=tmp_path, heartbeat_s=HEARTBEAT_S)
        try:
            assert client.redis.llen(names.node_queue("a")) == 1
            a.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            queued_events = queued.events(timeout_s=30)
            seen = []
            for event in queued_events:
                seen.append(event)
                if isinstance(event, ReroutedEvent):
                    moved_after = time.monotonic() - killed_at
            running_rest = list(running_events)
        finally:
            b.stop()

    assert moved_after < DETECTION_BOUND_S
    assert [e.type for e in seen[:2]] == ["rerouted", "started"]
    assert isinstance(seen[-1], DoneEvent) and seen[-1].result.node == "b"
    assert isinstance(running_rest[-1], InterruptedEvent)
    # The stale copy is gone from the dead node's queue: it will not run when a comes back.
    assert client.redis.llen(names.node_queue("a")) == 0


# --- a backend misbehaves --------------------------------------------------------------------


def test_a_backend_slow_to_its_first_token_gives_the_job_to_the_next_node(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "20000")), ("b", sim())
    ):
        started = time.monotonic()
        seen = list(client.stream(make_spec("quick please", first_token_timeout_s=0.5)))
        took = time.monotonic() - started

    failed = of_type(seen, ErrorEvent)
    assert len(failed) == 1 and failed[0].code == "backend_timeout" and not failed[0].final
    assert "no token within 0.5s" in failed[0].message
    assert of_type(seen, ReroutedEvent)[0].to_node == "b"
    assert isinstance(seen[-1], DoneEvent) and seen[-1].result.node == "b"
    assert took < 5


def test_a_backend_dropping_the_connection_mid_stream(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    reply = " ".join(f"w{i}" for i in range(12))
    with (
        running_fake_ollama(("llama3.2:1b",), reply=reply, drop_after=4) as fake,
        running_workers(broker_url, tmp_path, ("a", ["--ollama", fake.url])),
    ):
        seen = list(client.stream(make_spec("go", model="llama3.2:1b")))

    interrupted = seen[-1]
    assert isinstance(interrupted, InterruptedEvent) and interrupted.final
    assert interrupted.partial_text == "".join(e.text for e in of_type(seen, DeltaEvent))
    assert reply.startswith(interrupted.partial_text) and interrupted.partial_text
    assert fake.state.dropped_streams == 1


def test_a_failing_backend_trips_a_breaker_every_controller_respects(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """Three failures in a row open a/ollama's breaker; another controller process (here a
    second client) then routes around it without trying; after the cooldown one probe job
    finds it healthy again and closes it."""
    with (
        running_fake_ollama(("sim-small",), loaded=("sim-small",), reply="from ollama") as fake,
        # A long heartbeat: the node still advertises the backend as healthy, as it would
        # between two beats; only the jobs find out.
        running_workers(broker_url, tmp_path, ("b", sim())),
    ):
        a = start_worker(broker_url, "a", "--ollama", fake.url, log_dir=tmp_path, heartbeat_s=30)
        try:
            fake.state.fail_status = 503
            for _ in range(3):
                seen = list(client.stream(make_spec("hi", model="sim-small")))
                assert [s.node for s in of_type(seen, StartedEvent)] == ["a", "b"]
                assert isinstance(seen[-1], DoneEvent) and seen[-1].result.node == "b"
            assert client.cluster().breakers["a/ollama"].open

            other = CorralClient(client.settings)
            try:
                run = other.submit(make_spec("hi", model="sim-small"))
                assert run.candidate.node == "b"  # no attempt on a at all
                assert isinstance(list(run.events(timeout_s=10))[-1], DoneEvent)

                fake.state.fail_status = None
                time.sleep(client.settings.breaker_cooldown_s + 0.2)
                probe = other.submit(make_spec("hi", model="sim-small"))
                assert probe.candidate.node == "a"
                seen = list(probe.events(timeout_s=10))
                assert isinstance(seen[-1], DoneEvent) and seen[-1].result.text == "from ollama"
                assert "a/ollama" not in client.cluster().breakers
            finally:
                other.close()
        finally:
            a.stop()


# --- the broker restarts ---------------------------------------------------------------------


def test_redis_restarting_mid_job_loses_no_token(tmp_path: Path) -> None:
    server = start_redis(appendonly=True)
    try:
        url = server.url
        with (
            running_workers(url, tmp_path, ("a", sim("--sim-token-ms", "150"))) as (a,),
            CorralClient(build_settings(broker_url=url)) as client,
        ):
            run = client.submit(make_spec("survive a restart"))
            events = run.events(timeout_s=60)
            seen = until(events, 3)
            server.halt()
            time.sleep(1.0)
            server.resume()
            seen += list(events)
            assert a.process.poll() is None

            after = list(client.stream(make_spec("and after it")))
            assert isinstance(after[-1], DoneEvent)
    finally:
        server.stop()

    assert_in_order_once(seen)
    done = seen[-1]
    assert isinstance(done, DoneEvent), seen[-3:]
    assert done.result.text == expected("survive a restart")
    assert "".join(e.text for e in of_type(seen, DeltaEvent)) == done.result.text


# --- queues ------------------------------------------------------------------------------------


def test_interactive_jobs_overtake_batch_jobs_in_a_node_queue(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--capacity", "1", "--sim-token-ms", "30"))
    ):
        first = client.submit(make_spec("occupy the node"))
        until(first.events(timeout_s=30), 1)
        batch = [client.submit(make_spec(f"batch {i}", priority="batch")) for i in range(2)]
        interactive = client.submit(make_spec("a person is waiting"))
        started_at = {}
        for run in (*batch, interactive):
            events = list(run.events(timeout_s=30))
            assert isinstance(events[-1], DoneEvent)
            started_at[run.job_id] = of_type(events, StartedEvent)[0].ts

    assert started_at[interactive.job_id] < min(started_at[b.job_id] for b in batch)


def test_cancelling_a_queued_job_takes_it_out_of_the_queue_at_once(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--capacity", "1", "--sim-token-ms", "200"))
    ):
        first = client.submit(make_spec("occupy the node"))
        first_events = first.events(timeout_s=30)
        until(first_events, 1)
        queued = client.submit(make_spec("never mind"))
        assert client.redis.llen(names.node_queue("a")) == 1
        asked_at = time.monotonic()
        assert client.cancel(queued.job_id)
        seen = list(queued.events(timeout_s=10))
        ended_after = time.monotonic() - asked_at
        assert client.redis.llen(names.node_queue("a")) == 0
        assert isinstance(list(first_events)[-1], DoneEvent)  # the running job is untouched

    assert len(seen) == 1 and isinstance(seen[0], ErrorEvent) and seen[0].code == "cancelled"
    assert ended_after < 1.0


def test_a_backend_runs_no_more_jobs_at_once_than_its_capacity(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--capacity", "2", "--sim-token-ms", "100"))
    ):
        runs = [client.submit(make_spec(f"job {i}")) for i in range(3)]
        spans = []
        for run in runs:
            events = list(run.events(timeout_s=30))
            assert isinstance(events[-1], DoneEvent)
            spans.append((of_type(events, StartedEvent)[0].ts, events[-1].ts))

    third_start = sorted(spans)[2][0]
    assert third_start >= min(end for _, end in spans[:2]) - 0.05


# --- sessions ----------------------------------------------------------------------------------


def test_a_session_stays_on_its_node_and_carries_its_history(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(broker_url, tmp_path, ("a", sim()), ("b", sim())) as (_a, b):
        first = list(client.stream(make_spec("my name is Ada", node="b", session="s1")))
        assert isinstance(first[-1], DoneEvent) and first[-1].result.node == "b"
        follow_up = client.submit(make_spec("what is my name", session="s1"))
        assert follow_up.candidate.node == "b"  # a would win on the name otherwise
        assert [m.content for m in follow_up.spec.messages] == [
            "my name is Ada",
            expected("my name is Ada"),
            "what is my name",
        ]
        assert isinstance(list(follow_up.events(timeout_s=10))[-1], DoneEvent)

        b.stop()  # the session's node is gone: the conversation continues elsewhere
        moved = client.submit(make_spec("still there?", session="s1"))
        assert moved.candidate.node == "a"
        assert len(moved.spec.messages) == 5
        assert isinstance(list(moved.events(timeout_s=10))[-1], DoneEvent)


def test_a_poison_job_fails_after_the_set_attempts_and_the_cluster_keeps_serving(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    crash = ("--sim-crash-on", "POISON")
    nodes = [(name, sim(*crash)) for name in ("a", "b", "c")]
    with supervised_workers(broker_url, tmp_path, *nodes) as supervisor:
        seen = list(client.stream(make_spec("POISON pill", max_attempts=3)))
        final = seen[-1]
        assert isinstance(final, ErrorEvent) and final.final
        assert final.code == "attempts_exhausted"
        assert "job failed on 3 attempt(s)" in final.message
        moves = [(r.from_node, r.to_node) for r in of_type(seen, ReroutedEvent)]
        assert moves == [("a", "b"), ("b", "c")]
        assert "a: " in final.message and "c: " in final.message
        # It is not picked up again when the crashed workers come back.
        wait_until(lambda: sum(supervisor.restarts.values()) == 3, 30, "three restarts")
        time.sleep(3 * HEARTBEAT_S)
        assert sum(supervisor.restarts.values()) == 3

        healthy = list(client.stream(make_spec("an ordinary question")))
        assert isinstance(healthy[-1], DoneEvent)


def test_a_job_delivered_twice_streams_once(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """What a redelivery looks like to the workers (kombu restoring an unacknowledged message,
    a duplicate publish): the same attempt of the same job, twice. One copy streams; the other
    finds the lease taken and is dropped without calling its backend."""
    with running_workers(broker_url, tmp_path, ("a", sim()), ("b", sim())) as (a, b):
        run = client.submit(make_spec("only once please", node="a"))
        client._send(run.spec, run.candidate, attempt=1)  # the same message again
        seen = list(run.events(timeout_s=10))
        wait_until(
            lambda: "another delivery or attempt owns it" in a.log() + b.log(),
            10,
            "the second copy to be dropped",
        )
        time.sleep(0.5)
        log_length = client.redis.llen(names.job_log_key(run.job_id))

    assert_in_order_once(seen)
    assert len(of_type(seen, StartedEvent)) == 1
    assert "".join(e.text for e in of_type(seen, DeltaEvent)) == expected("only once please")
    assert log_length == len(seen)


# --- what `corral ask` shows -------------------------------------------------------------------


def ask(broker_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CORRAL_BROKER_URL": broker_url, **env}
    full_env.pop("CORRAL_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "controller", "ask", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        cwd=REPO_ROOT,
    )


def test_ask_says_where_the_job_moved_and_which_node_answered(
    broker_url: str, tmp_path: Path
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "20000")), ("b", sim())
    ):
        result = ask(broker_url, "hello there", CORRAL_FIRST_TOKEN_TIMEOUT_S="0.5")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected("hello there")
    err = " ".join(result.stderr.split())
    assert "a: backend 'simulated' on node 'a' produced no token within 0.5s" in err
    assert "moved to b (attempt 2)" in err
    assert "node b · simulated" in err


def test_ask_leaves_the_partial_answer_when_a_backend_drops_mid_stream(
    broker_url: str, tmp_path: Path
) -> None:
    reply = " ".join(f"w{i}" for i in range(12))
    with (
        running_fake_ollama(("llama3.2:1b",), reply=reply, drop_after=4) as fake,
        running_workers(broker_url, tmp_path, ("a", ["--ollama", fake.url])),
    ):
        result = ask(broker_url, "go")

    assert result.returncode == 4, result.stderr  # the backend failed
    assert result.stdout.strip() and reply.startswith(result.stdout.strip())
    err = " ".join(result.stderr.split())
    assert "job interrupted on node a" in err
    assert "--retry-partial restarts such a job on another node" in err


def test_a_llama_cpp_servers_slots_set_the_nodes_capacity(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """No --capacity given: the node asks the server (llama.cpp's /props) and runs that many
    jobs at once, never more."""
    with (
        running_fake_openai(
            total_slots=2, token_delay=0.05, reply="one two three four five"
        ) as fake,
        running_workers(broker_url, tmp_path, ("a", ["--openai-compat", fake.url])),
    ):
        (node,) = client.nodes()
        assert node.info.capacity == 2 and node.info.backends[0].capacity == 2
        runs = [client.submit(make_spec(f"job {i}")) for i in range(4)]
        for run in runs:
            assert isinstance(list(run.events(timeout_s=30))[-1], DoneEvent)
        assert fake.state.peak_streams == 2


def test_attach_reads_a_moved_job_as_its_owner_saw_it(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "20000")), ("b", sim())
    ):
        spec = make_spec("where did it run", first_token_timeout_s=0.5)
        owned = list(client.stream(spec))
        attached = list(client.attach(spec.job_id).events(timeout_s=10))

    assert attached == owned
    assert [e.type for e in attached[:4]] == ["started", "error", "rerouted", "started"]


def test_a_job_cancelled_while_its_node_is_unreachable_is_not_moved(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    """The cancel cannot reach a frozen worker; when the job's owner finds the node lost it
    ends the job as cancelled instead of sending it to another node."""
    with running_workers(
        broker_url, tmp_path, ("a", sim("--sim-first-token-ms", "20000")), ("b", sim())
    ) as (a, _b):
        run = client.submit(make_spec("never mind"))
        events = run.events(timeout_s=30)
        first = next(events)
        assert isinstance(first, StartedEvent) and first.node == "a"
        a.freeze()
        assert client.cancel(run.job_id)
        rest = list(events)
        a.thaw()

    assert [e.type for e in rest] == ["error"]
    assert isinstance(rest[0], ErrorEvent) and rest[0].code == "cancelled" and rest[0].final
