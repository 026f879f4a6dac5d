"""The rollout tests share one run of site.yml and one Redis started from its redis.conf."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.rollout.site_run import Rollout, rendered_redis_server, run_site


@pytest.fixture(scope="package")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Rollout:
    return run_site(tmp_path_factory.mktemp("rollout"))


@pytest.fixture(scope="package")
def rendered_redis(rollout: Rollout) -> Iterator[redis.Redis]:
    with rendered_redis_server(rollout) as client:
        yield client
