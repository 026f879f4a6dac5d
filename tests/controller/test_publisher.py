"""A client's held Celery producer: every message lands, from many threads and after a
Redis restart, and the producer goes back to kombu's pool on close."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from broker import names
from broker.celery_app import make_celery_app
from broker.settings import build_settings
from controller.publisher import HeldPublisher
from tests.support.servers import RedisServer, start_redis

QUEUE = names.node_queue("held")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()  # its own: one test restarts it
    yield server
    server.stop()


def queued_args(server: RedisServer) -> list[str]:
    admin = server.client()
    try:
        return sorted(json.loads(m)["headers"]["argsrepr"] for m in admin.lrange(QUEUE, 0, -1))
    finally:
        admin.close()


def test_sends_from_many_threads_all_land(own_redis: RedisServer) -> None:
    app = make_celery_app(build_settings(broker_url=own_redis.url))
    publisher = HeldPublisher(app)
    try:

        def send(thread: int) -> None:
            for i in range(25):
                publisher.send_task(names.RUN_JOB_TASK, args=[f"{thread}-{i}"], queue=QUEUE)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        publisher.close()
        app.close()
    expected = sorted(repr([f"{t}-{i}"]) for t in range(8) for i in range(25))
    assert queued_args(own_redis) == expected


def test_a_send_after_a_redis_restart_lands_and_close_returns_the_producer(
    own_redis: RedisServer,
) -> None:
    app = make_celery_app(build_settings(broker_url=own_redis.url))
    publisher = HeldPublisher(app)
    try:
        publisher.send_task(names.RUN_JOB_TASK, args=["before"], queue=QUEUE)
        own_redis.halt()  # no AOF: the queued message goes with it
        own_redis.resume()
        publisher.send_task(names.RUN_JOB_TASK, args=["after"], queue=QUEUE)
        assert queued_args(own_redis) == ["['after']"]
        in_use = app.producer_pool._dirty  # kombu's set of producers handed out
        assert len(in_use) == 1
        publisher.close()
        assert len(in_use) == 0
    finally:
        publisher.close()
        app.close()
