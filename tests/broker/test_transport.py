"""A full Redis (maxmemory under noeviction) is an outage the worker waits out, not a crash."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from broker import names
from broker.celery_app import make_celery_app
from broker.settings import build_settings
from broker.transport import RedisTransport
from controller.client import CorralClient, make_spec
from tests.support.servers import RedisServer, start_redis, start_worker, wait_until

SLOW = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "40"]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    # Its own server: this test fills it, and every other test shares the session's.
    server = start_redis()
    yield server
    server.stop()


def test_a_full_or_read_only_redis_counts_as_a_lost_connection() -> None:
    assert issubclass(OutOfMemoryError, RedisTransport.connection_errors)
    assert issubclass(ReadOnlyError, RedisTransport.connection_errors)
    app = make_celery_app(build_settings(broker_url="redis://127.0.0.1:1/0"))
    assert isinstance(app.connection_for_write().transport, RedisTransport)


def test_the_worker_outlives_a_full_redis_and_serves_once_memory_is_freed(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    admin = own_redis.client()
    worker = start_worker(own_redis.url, "alpha", *SLOW, log_dir=tmp_path)
    try:
        with CorralClient(build_settings(broker_url=own_redis.url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 10, "alpha up")
            run = client.submit(make_spec("tell me a long story"))
            events = run.events(30)
            next(events)  # started: the job is on the worker, its ack still to come

            # Every write refused from here on, as when Redis reaches maxmemory.
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            time.sleep(4)  # the job fails, its ack fails, heartbeats fail
            assert worker.process.poll() is None, worker.log()
            admin.config_set("maxmemory", "0")

            wait_until(lambda: any(n.up for n in client.nodes()), 15, "alpha up again")
            done = list(client.stream(make_spec("are you back?")))
            assert done[-1].type == "done", done[-1]
            assert done[-1].result.node == "alpha"  # type: ignore[union-attr]
            assert "Unrecoverable error" not in worker.log()
    finally:
        worker.stop()


def test_closing_a_connection_whose_settings_are_gone_does_not_raise(
    own_redis: RedisServer,
) -> None:
    """What Celery does when Redis restarts: close the lost connection. kombu's close hands
    the unacked messages back, through a connection already torn down; the stock transport's
    AttributeError ('NoneType' object has no attribute 'hostname') stopped the worker."""
    connection = Connection(own_redis.url, transport=RedisTransport)
    channel = connection.channel()
    channel.qos._delivered["a-delivery"] = ("message", "exchange", "routing key")
    connection.transport.client = None  # the state kombu's close leaves it in by then
    channel.close()  # must not raise


def test_acking_a_message_of_a_lost_connection_does_not_raise(own_redis: RedisServer) -> None:
    """A job that ran across a Redis restart ends after Celery replaced its connection; the
    ack goes to the old channel, whose transport is gone (the stock transport raised
    AttributeError: 'NoneType' object has no attribute 'client', stopping the worker)."""
    connection = Connection(own_redis.url, transport=RedisTransport)
    channel = connection.channel()
    channel.qos._delivered["a-delivery"] = ("message", "exchange", "routing key")
    channel.connection = None  # what closing the lost connection leaves behind
    channel.qos.ack("a-delivery")  # must not raise
    assert "a-delivery" in channel.qos._dirty  # acknowledged here, so consuming goes on


def test_a_channel_keeps_one_redis_client_and_publishes_across_a_redis_restart(
    own_redis: RedisServer,
) -> None:
    """The held client borrows a pooled connection per command, so after a restart the next
    publish reconnects like kombu's own per-publish client did, and every message lands."""
    app = make_celery_app(build_settings(broker_url=own_redis.url))
    queue = names.node_queue("q")
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
            for i in range(3):
                app.send_task(names.RUN_JOB_TASK, args=[i], queue=queue, connection=connection)
            own_redis.halt()  # no AOF: the three queued messages go with it
            own_redis.resume()
            app.send_task(names.RUN_JOB_TASK, args=[3], queue=queue, connection=connection)
        admin = own_redis.client()
        try:
            assert [json.loads(m)["headers"]["argsrepr"] for m in admin.lrange(queue, 0, -1)] == [
                "[3]"
            ]
        finally:
            admin.close()
    finally:
        app.close()
