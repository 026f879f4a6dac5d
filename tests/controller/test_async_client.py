"""The asyncio client on real parts: redis-server, worker processes, the fake Ollama.

Each test runs its scenario in one event loop (``asyncio.run``) against workers on a fresh
Redis database and checks what a user of the library would: the answer and which node gave
it, every event once and in order, that a cancel really closed the backend's stream, that a
job follows its node's death to another node, and that hundreds of streams share one loop
without a thread or a connection each.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from broker import names
from broker.errors import BrokerUnavailable, UnknownNode
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    ReroutedEvent,
    StartedEvent,
)
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.client import CorralClient, make_spec
from tests.fakes.fake_ollama import running_fake_ollama
from tests.support.servers import WorkerProcess, running_workers, start_redis, start_worker
from worker.backends.simulated import reply_for

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
LONG_REPLY = " ".join(f"word{i}" for i in range(60))


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


def assert_in_order_once(events: list[AnyStreamEvent]) -> None:
    assert [e.seq for e in events] == list(range(len(events)))


async def wait_for_nodes(client: AsyncCorralClient, count: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(n.up for n in await client.nodes()) < count:
        assert time.monotonic() < deadline, "the workers never came up"
        await asyncio.sleep(0.05)


@contextmanager
def ollama_worker(broker_url: str, name: str, url: str, log_dir: Path) -> Iterator[WorkerProcess]:
    worker = start_worker(broker_url, name, "--ollama", url, log_dir=log_dir)
    try:
        yield worker
    finally:
        worker.stop()


def test_a_job_streams_in_order_and_an_injected_redis_stays_open(
    broker_url: str, tmp_path: Path
) -> None:
    async def scenario() -> list[AnyStreamEvent]:
        shared = AsyncRedis.from_url(broker_url)
        try:
            async with AsyncCorralClient(build_settings(broker_url=broker_url), shared) as client:
                await wait_for_nodes(client, 2)
                nodes = {n.name for n in await client.nodes()}
                assert nodes == {"alpha", "beta"}
                spec = make_spec("write a haiku", tags=frozenset({"code"}))
                events = [e async for e in client.stream(spec)]
                assert client.following == 0  # the stream let go of its channel
                replay = await client.attach(spec.job_id)
                assert [e async for e in replay.events(timeout_s=5)] == events
                with pytest.raises(UnknownNode, match="no node named 'nowhere'"):
                    await client.submit(make_spec("hi", node="nowhere"))
            assert await shared.ping()  # the client did not close what it was lent
            return events
        finally:
            await shared.aclose()

    with running_workers(
        broker_url, tmp_path, ("alpha", [*FAST, "--tags", "code"]), ("beta", FAST)
    ):
        events = asyncio.run(scenario())

    assert_in_order_once(events)
    assert isinstance(events[0], StartedEvent) and events[0].node == "alpha"
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.result.node == "alpha"
    assert "".join(d.text for d in deltas) == done.result.text == expected("write a haiku")


def test_the_blocking_client_leaves_an_injected_redis_open(broker_url: str) -> None:
    shared = redis.Redis.from_url(broker_url)
    try:
        with CorralClient(build_settings(broker_url=broker_url), shared) as client:
            assert client.nodes() == []
        assert shared.ping()
    finally:
        shared.close()


def test_the_blocking_client_says_when_it_follows_too_many_streams(broker_url: str) -> None:
    shared = redis.Redis.from_url(broker_url)
    for job in ("job-0000001", "job-0000002", "job-0000003"):
        shared.set(names.job_node_key(job), "somewhere")
    with CorralClient(build_settings(broker_url=broker_url), max_streams=2) as client:
        held = [client.attach("job-0000001"), client.attach("job-0000002")]
        with pytest.raises(BrokerUnavailable, match="already follows 2 streams"):
            client.attach("job-0000003")
        held[0].close()
        client.attach("job-0000003").close()  # a stream let go of makes room
        held[1].close()
    shared.close()


def test_cancel_ends_the_stream_and_closes_the_backend_stream(
    broker_url: str, tmp_path: Path
) -> None:
    async def scenario() -> tuple[list[AnyStreamEvent], float]:
        async with AsyncCorralClient(build_settings(broker_url=broker_url)) as client:
            await wait_for_nodes(client, 1)
            run = await client.submit(make_spec("tell me a long story", node="pi1"))
            events = run.events(timeout_s=10)
            seen = [await anext(events), await anext(events)]
            assert isinstance(seen[1], DeltaEvent)
            assert await client.cancel(run.job_id)
            sent_at = time.monotonic()
            seen += [e async for e in events]
            return seen, time.monotonic() - sent_at

    with (
        running_fake_ollama(("llama3.2:1b",), reply=LONG_REPLY, token_delay=0.15) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path),
    ):
        seen, took_s = asyncio.run(scenario())
        assert fake.wait_until(lambda s: s.aborted_streams == 1, timeout=5)
        assert fake.state.streams_completed == 0

    assert_in_order_once(seen)
    last = seen[-1]
    assert isinstance(last, ErrorEvent) and last.code == "cancelled" and last.node == "pi1"
    assert sum(isinstance(e, DeltaEvent) for e in seen) < len(LONG_REPLY.split()) - 1
    assert took_s < 3


def test_a_job_follows_its_node_s_death_to_another_node(broker_url: str, tmp_path: Path) -> None:
    with running_workers(
        broker_url,
        tmp_path,
        ("a", ["--simulate", "--sim-first-token-ms", "60000"]),
        ("b", FAST),
    ) as (a, _b):

        async def scenario() -> list[AnyStreamEvent]:
            async with AsyncCorralClient(build_settings(broker_url=broker_url)) as client:
                await wait_for_nodes(client, 2)
                run = await client.submit(make_spec("hello there"))
                assert run.candidate.node == "a"  # equal nodes: the name breaks the tie
                events = run.events(timeout_s=30)
                seen = [await anext(events)]
                assert isinstance(seen[0], StartedEvent) and seen[0].node == "a"
                a.stop(signal.SIGKILL)
                seen += [e async for e in events]
                return seen

        seen = asyncio.run(scenario())

    assert_in_order_once(seen)
    rerouted = [e for e in seen if isinstance(e, ReroutedEvent)]
    assert [(r.from_node, r.to_node, r.attempt) for r in rerouted] == [("a", "b", 2)]
    assert "node 'a' stopped heartbeating" in rerouted[0].reason
    done = seen[-1]
    assert isinstance(done, DoneEvent) and done.result.node == "b"
    assert done.result.text == expected("hello there")


def test_five_hundred_streams_share_one_loop_and_one_connection(
    broker_url: str, tmp_path: Path
) -> None:
    streams = 500

    async def scenario() -> tuple[list[list[AnyStreamEvent]], int, int, int]:
        threads_before = threading.active_count()
        connections_before = redis_connections(broker_url)
        async with AsyncCorralClient(build_settings(broker_url=broker_url)) as client:
            await wait_for_nodes(client, 1)
            runs = await asyncio.gather(
                *(client.submit(make_spec(f"question {i}")) for i in range(streams))
            )
            held = client.following
            answers = await asyncio.gather(*(collect(run.events(timeout_s=60)) for run in runs))
            threads_during = threading.active_count() - threads_before
            connections = redis_connections(broker_url) - connections_before
            return answers, held, threads_during, connections

    with running_workers(broker_url, tmp_path, ("sim", [*FAST, "--capacity", "32"])):
        answers, held, extra_threads, redis_clients = asyncio.run(scenario())

    assert held == streams  # every stream was followed at once
    assert extra_threads <= 4  # the Celery send pool, not a thread per stream
    # The pool's bound (32) plus Celery's producer: not one per stream.
    assert redis_clients <= 40
    for i, events in enumerate(answers):
        assert_in_order_once(events)
        done = events[-1]
        assert isinstance(done, DoneEvent), done
        assert done.result.text == expected(f"question {i}")


def redis_connections(broker_url: str) -> int:
    """This process's open TCP connections to the Redis server."""
    port = int(broker_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def collect(events: object) -> list[AnyStreamEvent]:
    return [e async for e in events]  # type: ignore[attr-defined]


def test_an_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    async def scenario() -> str:
        settings = build_settings(broker_url="redis://:secret@127.0.0.1:1/0")
        async with AsyncCorralClient(settings) as client:
            try:
                await client.nodes()
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
        return "no error"

    message = asyncio.run(scenario())
    assert message.startswith("BrokerUnavailable: cannot reach Redis at")
    assert "secret" not in message


def test_redis_restarting_mid_job_loses_no_token_on_the_shared_connection(
    tmp_path: Path,
) -> None:
    server = start_redis(appendonly=True)
    try:
        url = server.url
        with running_workers(url, tmp_path, ("a", ["--simulate", "--sim-token-ms", "150"])):

            async def scenario() -> tuple[list[AnyStreamEvent], list[AnyStreamEvent]]:
                async with AsyncCorralClient(build_settings(broker_url=url)) as client:
                    await wait_for_nodes(client, 1)
                    run = await client.submit(make_spec("survive a restart"))
                    events = run.events(timeout_s=60)
                    seen = []
                    async for event in events:
                        seen.append(event)
                        if sum(isinstance(e, DeltaEvent) for e in seen) == 3:
                            break
                    await asyncio.to_thread(server.halt)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(server.resume)
                    seen += [e async for e in events]
                    after = [e async for e in client.stream(make_spec("and after it"))]
                    return seen, after

            seen, after = asyncio.run(scenario())
    finally:
        server.stop()

    assert_in_order_once(seen)
    done = seen[-1]
    assert isinstance(done, DoneEvent), seen[-3:]
    assert done.result.text == expected("survive a restart")
    assert "".join(e.text for e in seen if isinstance(e, DeltaEvent)) == done.result.text
    assert isinstance(after[-1], DoneEvent)  # the shared connection came back for new jobs
