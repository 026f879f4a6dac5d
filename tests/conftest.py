"""Session-wide real servers: one redis-server on a free port, a fresh database per user."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.servers import RedisServer, start_redis

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


def _fresh_db_url(server: RedisServer) -> str:
    db = next(_databases)
    if db >= 256:
        raise RuntimeError("ran out of Redis databases for this session")
    url = server.url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def broker_url(redis_server: RedisServer) -> str:
    """A Redis URL on a database no other test has used."""
    return _fresh_db_url(redis_server)


@pytest.fixture(scope="module")
def module_broker_url(redis_server: RedisServer) -> str:
    return _fresh_db_url(redis_server)


@pytest.fixture(scope="module")
def module_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")
