"""Redis at maxmemory under noeviction: every write refused. The user is told so, with the
fix, and nothing else breaks: once memory is freed, work goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import BrokerUnavailable
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.support.servers import REPO_ROOT, RedisServer, start_redis, start_worker, wait_until

FULL = "Redis is full"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()  # its own: this test fills it
    yield server
    server.stop()


def ask(url: str, prompt: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller", "ask", prompt],
        env={**os.environ, "CORRAL_BROKER_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


def test_a_full_redis_is_named_with_its_fix_and_work_goes_on_once_freed(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    admin = own_redis.client()
    worker = start_worker(
        own_redis.url, "alpha", "--simulate", "--sim-token-ms", "100", log_dir=tmp_path
    )
    try:
        with CorralClient(build_settings(broker_url=own_redis.url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 10, "alpha up")
            streaming = ask(own_redis.url, "tell me a long story")
            time.sleep(1.0)  # streaming by now
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # every write refused from here on
            _, err = streaming.communicate(timeout=60)
            assert streaming.returncode == 6, err  # the broker's exit code
            assert FULL in err and "raise maxmemory" in err and "Traceback" not in err

            fresh = ask(own_redis.url, "hello")
            _, err = fresh.communicate(timeout=60)
            assert fresh.returncode == 6 and FULL in err and "Traceback" not in err
            with pytest.raises(BrokerUnavailable, match=FULL):
                client.submit(make_spec("from the Python API"))

            admin.config_set("maxmemory", "0")
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "alpha up again")
            after = ask(own_redis.url, "and now?")
            out, err = after.communicate(timeout=60)
            assert after.returncode == 0, err
            assert out.strip()
    finally:
        worker.stop()
