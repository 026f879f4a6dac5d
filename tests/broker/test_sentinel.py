"""A broker that survives its host: a primary, a replica and three sentinels (real
redis-server processes), the primary killed while jobs stream, a replica promoted.

The failover time measured here is the one the README quotes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.celery_app import make_celery_app
from broker.errors import ConfigError
from broker.redis_clients import parse_sentinel_url, sync_client
from broker.schemas import AnyStreamEvent, ChatMessage, DeltaEvent, DoneEvent, InterruptedEvent
from broker.settings import CorralSettings, build_settings, redacted_url
from broker.transport import SentinelTransport
from controller.aclient import AsyncCorralClient
from controller.client import CorralClient, make_spec
from controller.health import check_broker
from tests.support.redis_ha import MASTER_NAME, PASSWORD, running_redis_ha
from tests.support.servers import start_worker, wait_until
from worker.backends.simulated import reply_for

# Long enough that every job is still streaming when the primary dies.
SLOW = ["--simulate", "--capacity", "4", "--sim-first-token-ms", "5", "--sim-token-ms", "150"]
# Sentinel's down-after (1 s here), its election and the promotion, on a loaded 2-core CI box.
FAILOVER_BOUND_S = 20.0


def test_a_sentinel_url_lists_the_sentinels_and_the_primarys_password_and_db() -> None:
    target = parse_sentinel_url(
        "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380",
        "corral",
    )
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (target.master_name, target.db, target.password) == ("corral", 2, "s3cret")


def test_a_bad_sentinel_url_is_a_clear_error_without_its_password() -> None:
    with pytest.raises(ConfigError, match="starts with sentinel://") as raised:
        parse_sentinel_url("sentinel://:s3cret@h1:26379;redis://:s3cret@h2:6379", "m")
    assert "s3cret" not in str(raised.value)


def test_settings_refuse_a_sentinel_list_mixing_schemes_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="every ;-separated entry") as raised:
        build_settings(broker_url="sentinel://:s3cret@h1:26379;redis://h2:6379")
    assert "s3cret" not in str(raised.value)


def test_unreachable_sentinels_are_a_short_check_failure_without_the_password() -> None:
    settings = build_settings(broker_url="sentinel://:s3cret@127.0.0.1:1/0;sentinel://127.0.0.1:2")
    checks, client = check_broker(settings)
    assert client is None
    [failed] = checks
    assert "no sentinel (127.0.0.1:1, 127.0.0.1:2) names a reachable primary" in failed.detail
    assert "s3cret" not in failed.detail and len(failed.detail) < 300, failed.detail


def test_redacted_url_hides_every_sentinel_entrys_password() -> None:
    shown = redacted_url("sentinel://:p@ss@h1:26379/0;sentinel://u:pw@h2:26379")
    assert shown == "sentinel://***@h1:26379/0;sentinel://***@h2:26379"


def test_celery_gets_the_sentinel_transport_with_the_primarys_name() -> None:
    settings = build_settings(
        broker_url="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", broker_master_name="corral"
    )
    app = make_celery_app(settings)
    assert app.conf.broker_transport_options["master_name"] == "corral"
    connection = app.connection_for_write()
    assert isinstance(connection.transport, SentinelTransport)
    # Celery's failover to the next ;-entry re-reads the scheme: still corral's transport.
    connection.switch("sentinel://127.0.0.1:2")
    assert isinstance(connection.transport, SentinelTransport)
    assert issubclass(redis.exceptions.ReadOnlyError, SentinelTransport.connection_errors)


def _first_write_after(client: redis.Redis, since: float) -> float:
    """Seconds from ``since`` until a write through the Sentinel client succeeds."""
    while True:
        try:
            client.set("corral:test:failover-probe", "1")
            return time.monotonic() - since
        except redis.exceptions.RedisError:
            time.sleep(0.05)


def _started(events: Iterator[AnyStreamEvent]) -> list[AnyStreamEvent]:
    seen: list[AnyStreamEvent] = []
    for event in events:
        seen.append(event)
        if isinstance(event, DeltaEvent):
            return seen
    raise AssertionError(f"stream ended before its first token: {seen}")


def test_jobs_in_flight_end_and_new_jobs_flow_when_the_primary_dies(tmp_path: Path) -> None:
    with running_redis_ha() as ha:
        settings = build_settings(broker_url=ha.url, broker_master_name=MASTER_NAME)
        env = {"CORRAL_BROKER_MASTER_NAME": MASTER_NAME}
        workers = [
            start_worker(ha.url, name, *SLOW, log_dir=tmp_path, env=env) for name in ("a", "b")
        ]
        probe = sync_client(settings, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            with CorralClient(settings) as client:
                wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "a and b up")
                prompts = [f"a long story {i}" for i in range(4)]
                runs = [client.submit(make_spec(p)) for p in prompts]
                streams = [run.events(timeout_s=90) for run in runs]
                seen = [_started(events) for events in streams]

                old_primary = ha.primary_port()
                ha.kill(old_primary)
                killed_at = time.monotonic()
                writable_after = _first_write_after(probe, killed_at)
                assert ha.primary_port() != old_primary

                # A new job while the four are still streaming: how soon work flows again.
                # The nodes' liveness keys (3 heartbeats) may have expired meanwhile: a node
                # counts once its next heartbeat reaches the new primary.
                wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 30, "nodes back")
                nodes_back_after = time.monotonic() - killed_at
                after_events = client.stream(make_spec("and after the failover"))
                after = _started(after_events)
                first_token_after = time.monotonic() - killed_at
                after += list(after_events)
                for events, so_far in zip(streams, seen, strict=True):
                    so_far += list(events)
                # The asyncio client (the gateway's, MCP's) finds the new primary as well.
                async_after = asyncio.run(_async_job(settings, "and asynchronously"))
            for worker in workers:
                assert worker.process.poll() is None, worker.log()
                assert PASSWORD not in worker.log()
        finally:
            probe.close()
            for worker in workers:
                worker.stop()

    outcomes = [
        "moved" if any(e.type == "rerouted" for e in events) else events[-1].type for events in seen
    ]
    print(
        f"\nfailover: writable after {writable_after:.1f} s, nodes up {nodes_back_after:.1f} s,"
        f" a new job's first token {first_token_after:.1f} s after the primary died;"
        f" in flight: {outcomes}"
    )
    assert writable_after < FAILOVER_BOUND_S
    assert first_token_after < FAILOVER_BOUND_S
    for prompt, events in zip(prompts, seen, strict=True):
        last = events[-1]
        # Done (on its node, or moved to the other), or interrupted with what it had produced;
        # never silent.
        assert isinstance(last, DoneEvent | InterruptedEvent), events[-3:]
        if isinstance(last, DoneEvent):
            assert last.result.text == reply_for_prompt(prompt)
    assert isinstance(after[-1], DoneEvent), after[-3:]
    assert isinstance(async_after[-1], DoneEvent), async_after[-3:]


async def _async_job(settings: CorralSettings, prompt: str) -> list[AnyStreamEvent]:
    async with AsyncCorralClient(settings) as client:
        return [event async for event in client.stream(make_spec(prompt))]


def reply_for_prompt(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])
