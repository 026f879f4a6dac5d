"""Circuit breakers on a real Redis: tripping, cooling down, one probe at a time, closing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from controller.breaker import BreakerPhase, Breakers
from controller.cluster import read_cluster


@pytest.fixture
def conn(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


def phase(conn: redis.Redis, target: str, cooldown_s: float) -> BreakerPhase:
    view = read_cluster(conn)
    state = view.breakers.get(target)
    return BreakerPhase.CLOSED if state is None else state.phase(view.redis_time, cooldown_s)


def test_a_breaker_opens_after_the_threshold_of_consecutive_failures(conn: redis.Redis) -> None:
    breakers = Breakers(conn, threshold=3, cooldown_s=30)
    assert not breakers.record_failure("pi2/ollama")
    assert not breakers.record_failure("pi2/ollama")
    assert phase(conn, "pi2/ollama", 30) is BreakerPhase.CLOSED
    assert breakers.record_failure("pi2/ollama")
    assert phase(conn, "pi2/ollama", 30) is BreakerPhase.OPEN
    assert phase(conn, "pi2", 30) is BreakerPhase.CLOSED  # the node itself is another target


def test_a_success_resets_the_count(conn: redis.Redis) -> None:
    breakers = Breakers(conn, threshold=2, cooldown_s=30)
    breakers.record_failure("pi2")
    breakers.record_success("pi2")
    assert not breakers.record_failure("pi2")  # one in a row again, not two


def test_after_the_cooldown_exactly_one_controller_may_probe(conn: redis.Redis) -> None:
    first = Breakers(conn, threshold=1, cooldown_s=0.3)
    second = Breakers(
        redis.Redis(connection_pool=conn.connection_pool), threshold=1, cooldown_s=0.3
    )
    first.record_failure("pi2")
    assert phase(conn, "pi2", 0.3) is BreakerPhase.OPEN
    time.sleep(0.4)
    assert phase(conn, "pi2", 0.3) is BreakerPhase.HALF_OPEN
    assert first.try_probe("pi2")
    assert not second.try_probe("pi2")


def test_a_failed_probe_opens_it_again_and_a_good_one_closes_it(conn: redis.Redis) -> None:
    breakers = Breakers(conn, threshold=1, cooldown_s=0.3)
    breakers.record_failure("pi2")
    time.sleep(0.4)
    assert breakers.try_probe("pi2")
    assert breakers.record_failure("pi2")  # the probe failed
    assert phase(conn, "pi2", 0.3) is BreakerPhase.OPEN  # a fresh cooldown
    time.sleep(0.4)
    assert breakers.try_probe("pi2")  # the failed probe gave its permit back
    breakers.record_success("pi2")
    assert phase(conn, "pi2", 0.3) is BreakerPhase.CLOSED
    assert "pi2" not in read_cluster(conn).breakers


def test_a_providers_retry_after_holds_the_breaker_for_exactly_that_long(
    conn: redis.Redis,
) -> None:
    breakers = Breakers(conn, threshold=3, cooldown_s=30)
    until = breakers.hold("cloud/anthropic", 0.5, "rate_limited")
    state = read_cluster(conn).breakers["cloud/anthropic"]
    assert state.reason == "rate_limited" and state.held_until == pytest.approx(until)
    assert until - state.opened_at == pytest.approx(0.5, abs=0.002)  # not the 30 s default
    assert phase(conn, "cloud/anthropic", 30) is BreakerPhase.OPEN
    # Another job's failure arriving meanwhile keeps the hold (and counts).
    assert breakers.record_failure("cloud/anthropic")
    assert read_cluster(conn).breakers["cloud/anthropic"].held_until == pytest.approx(until)
    time.sleep(0.6)
    assert phase(conn, "cloud/anthropic", 30) is BreakerPhase.HALF_OPEN
    assert breakers.try_probe("cloud/anthropic")
    breakers.record_success("cloud/anthropic")
    assert "cloud/anthropic" not in read_cluster(conn).breakers


def test_a_shorter_hold_never_cuts_a_longer_one(conn: redis.Redis) -> None:
    breakers = Breakers(conn, threshold=3, cooldown_s=30)
    long = breakers.hold("cloud/openai", 3600, "quota_exhausted")
    assert breakers.hold("cloud/openai", 2, "rate_limited") == pytest.approx(long)
    state = read_cluster(conn).breakers["cloud/openai"]
    assert state.reason == "quota_exhausted" and state.failures == 2
