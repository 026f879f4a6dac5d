"""A real network partition: a worker on a host of its own (a network namespace joined by a
veth pair) is cut off from Redis mid-job, then reconnected.

Cut off, the worker is to the cluster what a frozen one is: its heartbeats stop, so the job
moves (before its first token) or ends interrupted with its partial text (after). Reconnected,
the same TCP connections carry what the worker tried to write meanwhile; the job's lease
refuses all of it, and the node rejoins and serves the next job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import names
from broker.schemas import DeltaEvent, DoneEvent, InterruptedEvent, ReroutedEvent, StartedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.controller.test_failover import (
    DETECTION_BOUND_S,
    HEARTBEAT_S,
    assert_in_order_once,
    expected,
    of_type,
    sim,
    until,
)
from tests.support.netns import NamespacedHost, namespaced_host, why_namespaces_cannot_be_made
from tests.support.servers import RedisServer, WorkerProcess, start_redis, start_worker, wait_until

_CANNOT = why_namespaces_cannot_be_made()
pytestmark = pytest.mark.skipif(_CANNOT is not None, reason=f"no network namespaces: {_CANNOT}")

PASSWORD = "partition-test-7f3"


@pytest.fixture
def host() -> Iterator[NamespacedHost]:
    with namespaced_host() as made:
        yield made


@pytest.fixture
def broker(host: NamespacedHost) -> Iterator[RedisServer]:
    # Its own server, listening on the veth too (with a password: Redis refuses other
    # interfaces in protected mode, as a real broker would be set up).
    server = start_redis(password=PASSWORD, bind=f"127.0.0.1 {host.host_address}")
    yield server
    server.stop()


def url_from(server: RedisServer, address: str) -> str:
    return f"redis://:{PASSWORD}@{address}:{server.port}/0"


def start_pair(
    server: RedisServer, host: NamespacedHost, log_dir: Path, *a_args: str
) -> tuple[WorkerProcess, WorkerProcess]:
    """Node a behind the veth (it wins ties by name), node b on this machine."""
    a = start_worker(
        url_from(server, host.host_address),
        "a",
        *sim(*a_args),
        log_dir=log_dir,
        heartbeat_s=HEARTBEAT_S,
        command_prefix=host.command_prefix(),
    )
    b = start_worker(server.url, "b", *sim(), log_dir=log_dir, heartbeat_s=HEARTBEAT_S)
    return a, b


@pytest.fixture
def client(broker: RedisServer) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=broker.url)) as c:
        yield c


def test_cut_off_before_its_first_token_the_job_moves_and_the_node_rejoins(
    broker: RedisServer, host: NamespacedHost, client: CorralClient, tmp_path: Path
) -> None:
    a, b = start_pair(broker, host, tmp_path, "--sim-first-token-ms", "2500")
    try:
        wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "a and b up")
        run = client.submit(make_spec("are you there"))
        events = run.events(timeout_s=30)
        first = next(events)
        assert isinstance(first, StartedEvent) and first.node == "a"
        host.cut()
        cut_at = time.monotonic()
        seen = [first]
        for event in events:
            seen.append(event)
            if isinstance(event, ReroutedEvent):
                moved_after = time.monotonic() - cut_at
        host.heal()
        wait_until(lambda: "moved to another node" in a.log(), 20, "a to notice it lost the job")
        log_length = client.redis.llen(names.job_log_key(run.job_id))

        assert_in_order_once(seen)
        assert moved_after < DETECTION_BOUND_S
        assert log_length == len(seen)  # a wrote nothing once reconnected
        done = seen[-1]
        assert isinstance(done, DoneEvent) and done.result.node == "b"
        assert done.result.text == expected("are you there")

        wait_until(lambda: {n.name for n in client.nodes() if n.up} == {"a", "b"}, 20, "a back")
        again = list(client.stream(make_spec("and now?", node="a")))
        assert isinstance(again[-1], DoneEvent) and again[-1].result.node == "a"
    finally:
        a.stop()
        b.stop()


def test_cut_off_mid_answer_the_job_ends_interrupted_with_its_partial_text(
    broker: RedisServer, host: NamespacedHost, client: CorralClient, tmp_path: Path
) -> None:
    a, b = start_pair(broker, host, tmp_path, "--sim-token-ms", "150")
    try:
        wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "a and b up")
        run = client.submit(make_spec("tell me a story"))
        events = run.events(timeout_s=30)
        seen = until(events, 3)
        host.cut()
        seen += list(events)
        host.heal()
        wait_until(lambda: "moved to another node" in a.log(), 20, "a to notice it lost the job")
        log_length = client.redis.llen(names.job_log_key(run.job_id))

        assert_in_order_once(seen)
        assert log_length == len(seen)
        interrupted = seen[-1]
        assert isinstance(interrupted, InterruptedEvent) and interrupted.code == "node_lost"
        partial = "".join(e.text for e in of_type(seen, DeltaEvent))
        assert interrupted.partial_text == partial
        assert expected("tell me a story").startswith(partial)

        wait_until(lambda: {n.name for n in client.nodes() if n.up} == {"a", "b"}, 20, "a back")
        again = list(client.stream(make_spec("and now?", node="a")))
        assert isinstance(again[-1], DoneEvent) and again[-1].result.node == "a"
    finally:
        a.stop()
        b.stop()
