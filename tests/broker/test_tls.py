"""Redis over TLS: ``rediss://`` with the CA in ``broker_ca_file``, checked end to end against a
redis-server that speaks only TLS, with a CA the test makes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.errors import ConfigError
from broker.redis_clients import sync_client
from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.health import check_broker
from tests.support.redis_ha import TlsRedis, make_ca_and_server_cert, running_tls_redis
from tests.support.servers import start_worker, wait_until


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    with running_tls_redis() as server:
        yield server


def test_a_worker_and_a_client_run_a_job_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    ca = str(tls_redis.ca_file)
    worker = start_worker(
        tls_redis.url,
        "tls-node",
        "--simulate",
        log_dir=tmp_path,
        env={"CORRAL_BROKER_CA_FILE": ca},
    )
    try:
        with CorralClient(build_settings(broker_url=tls_redis.url, broker_ca_file=ca)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "tls-node up")
            events = list(client.stream(make_spec("hello over TLS")))
        assert isinstance(events[-1], DoneEvent), events[-1]
        assert events[-1].result.node == "tls-node"
    finally:
        worker.stop()


def test_a_certificate_from_another_ca_is_refused(tls_redis: TlsRedis, tmp_path: Path) -> None:
    other_ca, _cert, _key = make_ca_and_server_cert(tmp_path)
    client = sync_client(
        build_settings(broker_url=tls_redis.url, broker_ca_file=str(other_ca)),
        socket_connect_timeout=2,
    )
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            client.ping()
    finally:
        client.close()


def test_the_health_check_reports_the_broker_over_tls(tls_redis: TlsRedis) -> None:
    settings = build_settings(broker_url=tls_redis.url, broker_ca_file=str(tls_redis.ca_file))
    checks, client = check_broker(settings)
    assert client is not None, checks
    client.close()


def test_a_ca_file_needs_a_tls_url_and_must_exist(tmp_path: Path) -> None:
    ca, _cert, _key = make_ca_and_server_cert(tmp_path)
    with pytest.raises(ConfigError, match="not rediss://"):
        build_settings(broker_url="redis://127.0.0.1:6379/0", broker_ca_file=str(ca))
    with pytest.raises(ConfigError, match="is not a file"):
        build_settings(broker_url="rediss://h:6379/0", broker_ca_file=str(tmp_path / "nope.pem"))
