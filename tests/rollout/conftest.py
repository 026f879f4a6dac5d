"""The rollout tests share one run of site.yml and one Redis started from its redis.conf."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.rollout.site_run import Rollout, rendered_redis_server, run_site
from tests.support.ssh_server import SSHServer


@pytest.fixture(scope="package")
def rollout_ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """The SSH server the rolled-out node's tunnel goes through (asyncssh: no sshd here)."""
    server = SSHServer(tmp_path_factory.mktemp("ssh"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def rollout(tmp_path_factory: pytest.TempPathFactory, rollout_ssh_server: SSHServer) -> Rollout:
    return run_site(tmp_path_factory.mktemp("rollout"), rollout_ssh_server)


@pytest.fixture(scope="package")
def rendered_redis(rollout: Rollout) -> Iterator[redis.Redis]:
    with rendered_redis_server(rollout) as client:
        yield client
