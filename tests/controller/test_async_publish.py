"""The asyncio client's publish on its event loop, against a real redis-server.

What a user relies on: the message is the one Celery's ``send_task`` writes (a worker and
Flower cannot tell them apart), it lands on the queue for its priority with the job's node
record, and a broker that is down or stalled is a clear error within a bounded time while the
event loop keeps running, with the job queued once or not at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from celery import signals

from broker import names
from broker.celery_app import make_celery_app
from broker.errors import BrokerUnavailable
from broker.schemas import AnyStreamEvent, DoneEvent
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.apublisher import AsyncPublisher
from controller.client import make_spec
from controller.dispatch import WRITES_REFUSED, job_task
from controller.router import Candidate
from tests.support.servers import RedisServer, running_workers, start_redis, wait_until

CANDIDATE = Candidate(
    node="pi", backend="ollama", model="m:1b", model_loaded=True, spare=1, load=0, reason="r"
)
NODE_KEY = names.job_node_key("the-job")
FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()  # its own: tests stop and freeze it
    yield server
    server.process.send_signal(signal.SIGCONT)  # (a no-op unless a test froze it)
    server.stop()


def decoded(raw: bytes) -> dict[str, Any]:
    """A queued message with its body decoded, as a worker reads it."""
    message: dict[str, Any] = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def run_publish(
    url: str,
    scenario: Callable[[AsyncPublisher, redis.asyncio.Redis], Awaitable[Any]],
    **settings: Any,
) -> Any:
    async def main() -> Any:
        app = make_celery_app(build_settings(broker_url=url, **settings))
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2)
        try:
            return await scenario(AsyncPublisher(app, client, url), client)
        finally:
            await client.aclose()
            app.close()

    return asyncio.run(main())


async def publish_job(publisher: AsyncPublisher, priority: str = "interactive") -> str:
    spec = make_spec("hello", priority=priority)  # type: ignore[arg-type]
    task = job_task(spec, CANDIDATE, attempt=1)
    envelope = publisher.builder.build(task.name, **task.kwargs)
    await publisher.publish(
        envelope, node_key=NODE_KEY, node=CANDIDATE.node, ttl_s=60, redis_now=time.time
    )
    return envelope.list_key


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_the_message_is_the_one_send_task_writes(own_redis: RedisServer, priority: str) -> None:
    spec = make_spec("what is the message?", priority=priority)  # type: ignore[arg-type]
    task = job_task(spec, CANDIDATE, attempt=1)
    admin = own_redis.client()

    app = make_celery_app(build_settings(broker_url=own_redis.url))
    app.send_task(task.name, **task.kwargs)
    app.close()
    [celery_list] = admin.keys(f"{names.node_queue('pi')}*")
    by_celery = decoded(admin.rpop(celery_list))  # type: ignore[arg-type]

    async def publish(publisher: AsyncPublisher, _: redis.asyncio.Redis) -> None:
        envelope = publisher.builder.build(task.name, **task.kwargs)
        await publisher.publish(
            envelope, node_key=NODE_KEY, node="pi", ttl_s=60, redis_now=time.time
        )

    run_publish(own_redis.url, publish)
    ours_list = celery_list  # the same list: the same priority step
    assert admin.llen(ours_list) == 1
    ours = decoded(admin.rpop(ours_list))  # type: ignore[arg-type]

    # Only the ids kombu and Celery make per message and per thread differ.
    for message in (by_celery, ours):
        assert message["properties"].pop("delivery_tag")
        assert message["properties"].pop("reply_to")
        assert message["headers"].pop("origin")
    assert ours == by_celery
    assert ours["headers"]["id"] == spec.job_id
    assert ours["headers"]["argsrepr"].startswith(f"job={spec.job_id}")
    step = names.INTERACTIVE_PRIORITY if priority == "interactive" else names.BATCH_PRIORITY
    assert ours["properties"]["priority"] == step
    assert celery_list.decode() == names.node_queue_lists("pi")[step != 0]
    assert admin.get(NODE_KEY) == b"pi" and 0 < admin.ttl(NODE_KEY) <= 60


def test_celery_s_publish_signals_fire_with_the_message(own_redis: RedisServer) -> None:
    seen: list[tuple[str, str]] = []

    def before(headers: dict[str, Any], routing_key: str, **_: Any) -> None:
        headers["traceparent"] = "00-abc-def-01"  # as OpenTelemetry's Celery hook does
        seen.append(("before", routing_key))

    def after(routing_key: str, **_: Any) -> None:
        seen.append(("after", routing_key))

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        queue = run_publish(own_redis.url, lambda p, _: publish_job(p))
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", names.node_queue("pi")), ("after", names.node_queue("pi"))]
    [raw] = own_redis.client().lrange(queue, 0, -1)
    assert decoded(raw)["headers"]["traceparent"] == "00-abc-def-01"


async def ticking(gaps: list[float]) -> None:
    """Notes the longest pause of the event loop (a frozen loop shows as a long gap)."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


async def publish_while_ticking(publisher: AsyncPublisher) -> tuple[str, float, float]:
    gaps: list[float] = []
    ticker = asyncio.create_task(ticking(gaps))
    started = time.monotonic()
    try:
        await publish_job(publisher)
    except BrokerUnavailable as exc:
        return str(exc), time.monotonic() - started, max(gaps, default=0.0)
    finally:
        ticker.cancel()
    return "no error", time.monotonic() - started, max(gaps, default=0.0)


def test_an_unreachable_broker_is_a_clear_error_and_the_loop_runs_on(
    own_redis: RedisServer,
) -> None:
    url = own_redis.url.replace("redis://", "redis://:secret@")
    own_redis.stop()  # nothing listens there now

    message, took, longest_pause = run_publish(url, lambda p, _: publish_while_ticking(p))
    assert message.startswith("cannot reach Redis at") and "queue the job" in message
    assert "secret" not in message
    assert took < 3.0  # Celery's retry policy: 3 retries, 0 to 1 s apart
    assert longest_pause < 0.2


def test_a_stalled_broker_is_a_clear_error_in_bounded_time_and_queues_nothing(
    own_redis: RedisServer,
) -> None:
    async def scenario(publisher: AsyncPublisher, client: redis.asyncio.Redis) -> Any:
        publisher.timeout_s = 2.0
        # The script is loaded and the connection open, as in a client that has sent jobs:
        # the push is written to the socket and runs once Redis wakes.
        await AsyncPublisher.preload_into(client)
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            return await publish_while_ticking(publisher)
        finally:
            own_redis.process.send_signal(signal.SIGCONT)

    message, took, longest_pause = run_publish(own_redis.url, scenario)
    assert "did not take the job's message within 2 s" in message
    assert "not queued" in message
    assert 1.9 < took < 3.0
    assert longest_pause < 0.2
    # Redis, woken, runs the push that sat in its socket: past its deadline, it adds nothing.
    admin = own_redis.client()
    time.sleep(0.3)
    assert admin.keys(f"{names.node_queue('pi')}*") == []
    assert admin.get(NODE_KEY) is None


def test_a_reply_lost_after_the_push_does_not_queue_the_job_twice(
    own_redis: RedisServer,
) -> None:
    async def scenario(publisher: AsyncPublisher, _: redis.asyncio.Redis) -> str:
        script = publisher._script
        calls: list[list[Any]] = []

        async def push_then_lose_the_reply(**kwargs: Any) -> Any:
            calls.append(list(kwargs["args"]))
            reply = await script(**kwargs)
            if len(calls) == 1:
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            return reply

        publisher._script = push_then_lose_the_reply  # type: ignore[assignment]
        queue = await publish_job(publisher)
        assert [c[-1] for c in calls] == [0, 1]  # the retry looked before pushing
        return queue

    queue = run_publish(own_redis.url, scenario)
    assert own_redis.client().llen(queue) == 1


def test_a_view_of_redis_s_clock_far_off_still_queues_the_job_once(
    own_redis: RedisServer,
) -> None:
    """The deadline comes from the cluster view's reading of Redis's clock; if that is off (a
    clock step since), Redis answers at once that it is late and the push goes again on
    Redis's own time."""

    async def scenario(publisher: AsyncPublisher, _: redis.asyncio.Redis) -> tuple[str, float]:
        task = job_task(make_spec("hello"), CANDIDATE, attempt=1)
        envelope = publisher.builder.build(task.name, **task.kwargs)
        started = time.monotonic()
        await publisher.publish(
            envelope, node_key=NODE_KEY, node="pi", ttl_s=60, redis_now=lambda: time.time() - 600
        )
        return envelope.list_key, time.monotonic() - started

    queue, took = run_publish(own_redis.url, scenario)
    assert own_redis.client().llen(queue) == 1
    assert took < 1.0


def test_a_full_redis_refuses_the_push_as_a_write(own_redis: RedisServer) -> None:
    admin = own_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")

    async def scenario(publisher: AsyncPublisher, _: redis.asyncio.Redis) -> str:
        try:
            await publish_job(publisher)
        except WRITES_REFUSED as exc:
            return str(exc)
        return "no error"

    message = run_publish(own_redis.url, scenario)
    admin.config_set("maxmemory", "0")
    assert "maxmemory" in message  # what controller.dispatch.refused_write names
    assert admin.keys(f"{names.node_queue('pi')}*") == []


def test_a_worker_runs_the_job_and_celery_s_events_show_it_as_flower_reads_them(
    broker_url: str, tmp_path: Path
) -> None:
    """With task events on (as Flower turns them on), the client's task-sent event and the
    worker's received/succeeded events name the job, as for a message from ``send_task``."""
    settings = build_settings(broker_url=broker_url, task_events=True)
    events: list[dict[str, Any]] = []
    listening = threading.Event()
    stop = threading.Event()

    def receive() -> None:
        app = make_celery_app(settings)
        try:
            with app.connection_for_read() as connection:
                receiver = app.events.Receiver(connection, handlers={"*": events.append})
                listening.set()
                for _ in receiver.consume(limit=None, timeout=0.5, wakeup=False):
                    if stop.is_set():
                        break
        except TimeoutError:
            pass
        finally:
            app.close()

    async def scenario() -> list[AnyStreamEvent]:
        async with AsyncCorralClient(settings) as client:
            deadline = time.monotonic() + 15
            while not any(n.up for n in await client.nodes()):
                assert time.monotonic() < deadline, "the worker never came up"
                await asyncio.sleep(0.05)
            return [e async for e in client.stream(make_spec("seen by flower?"))]

    listener = threading.Thread(target=receive)
    with running_workers(broker_url, tmp_path, ("alpha", FAST), env={"CORRAL_TASK_EVENTS": "true"}):
        listener.start()
        try:
            assert listening.wait(10)
            time.sleep(0.5)  # its queue bound to the event exchange
            stream = asyncio.run(scenario())
            wait_until(
                lambda: {"task-sent", "task-succeeded"} <= {e["type"] for e in events},
                10,
                "the job's events",
            )
        finally:
            stop.set()
            listener.join(timeout=10)

    done = stream[-1]
    assert isinstance(done, DoneEvent) and done.result.node == "alpha"
    job_id = done.job_id
    by_type = {e["type"]: e for e in events if e.get("uuid") == job_id}
    assert by_type["task-sent"]["name"] == names.RUN_JOB_TASK
    assert by_type["task-sent"]["queue"] == names.node_queue("alpha")
    assert by_type["task-received"]["args"].startswith(f"job={job_id}")
    assert "task-succeeded" in by_type
