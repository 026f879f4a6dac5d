"""Least-privilege Redis users, applied to a real redis-server and used by real workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError

from broker import acl, names
from broker.ratelimits import ADMIT_LUA
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.client import CorralClient, make_spec
from tests.controller.test_flower import start_flower
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    start_redis,
    start_worker,
    wait_until,
)

# About 20 tokens 20 ms apart: a job runs long enough that the cancel below always finds it
# running (at 1 ms a token a loaded machine let it finish first).
SIMULATED = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "20"]
PASSWORDS = {"alpha": "alpha-secret-5d1", "beta": "beta-secret-9c2", "ctl": "ctl-secret-77e"}


def corral_acl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    # Its own server: ACL users are server-wide, and the other tests connect as the default user.
    own = start_redis()
    env = {"PW_ALPHA": PASSWORDS["alpha"], "PW_BETA": PASSWORDS["beta"], "PW_CTL": PASSWORDS["ctl"]}
    applied = corral_acl(
        "--broker",
        own.url,
        "acl",
        "--worker",
        "alpha=PW_ALPHA",
        "--worker",
        "beta=PW_BETA",
        "--controller",
        "PW_CTL",
        "--apply",
        env=env,
    )
    assert applied.returncode == 0, applied.stderr
    yield own
    own.stop()


def url_as(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def worker_url(server: RedisServer, node: str) -> str:
    return url_as(server, acl.worker_user(node), PASSWORDS[node])


def controller_url(server: RedisServer) -> str:
    return url_as(server, acl.CONTROLLER_USER, PASSWORDS["ctl"])


@pytest.fixture(scope="module")
def workers(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    logs = tmp_path_factory.mktemp("acl-logs")
    started: list[WorkerProcess] = []
    try:
        for node in ("alpha", "beta"):
            # Task events on, as with Flower watching: their channels are part of the grant.
            started.append(
                start_worker(
                    worker_url(server, node),
                    node,
                    *SIMULATED,
                    log_dir=logs,
                    env={"CORRAL_TASK_EVENTS": "true"},
                )
            )
        yield
    finally:
        for w in started:
            w.stop()


def test_the_printed_lines_carry_a_hash_never_the_password() -> None:
    printed = corral_acl(
        "acl", "--worker", "pi2=PW", "--controller", "PW", env={"PW": "do-not-print-me"}
    )
    assert printed.returncode == 0, printed.stderr
    assert "do-not-print-me" not in printed.stdout + printed.stderr
    assert acl.password_hash("do-not-print-me") in printed.stdout
    assert '"corral-worker-pi2"' in printed.stdout and '"corral-controller"' in printed.stdout
    assert "\\x06\\x16" in printed.stdout  # the priority lists, escaped for redis-cli

    missing = corral_acl("acl", "--worker", "pi2=NOT_SET_ANYWHERE", env={})
    assert missing.returncode == 2
    assert "NOT_SET_ANYWHERE" in missing.stderr and "Traceback" not in missing.stderr


def test_workers_and_controller_serve_jobs_with_only_their_grants(
    server: RedisServer, workers: None, tmp_path: Path
) -> None:
    with CorralClient(build_settings(broker_url=controller_url(server))) as client:
        wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "both workers up")
        for node in ("alpha", "beta"):
            events = list(client.stream(make_spec("hello", node=node, session=f"s-{node}")))
            assert events[-1].type == "done", events[-1]
        run = client.submit(make_spec("a story to cancel", node="alpha"))
        client.cancel(run.spec.job_id)
        assert list(run.events(10))[-1].type == "error"

    async def through_the_asyncio_client() -> str:
        # It publishes with a script of its own (and Celery's task-sent events by kombu).
        settings = build_settings(broker_url=controller_url(server), task_events=True)
        async with AsyncCorralClient(settings) as aclient:
            events = [e async for e in aclient.stream(make_spec("hello", node="beta"))]
            return events[-1].type

    assert asyncio.run(through_the_asyncio_client()) == "done"
    flower = start_flower(controller_url(server), tmp_path)
    try:
        wait_until(lambda: flower.get("/api/workers")[0] == 200, 15, "flower lists workers")
    finally:
        flower.stop()
    denied = server.client().execute_command("ACL", "LOG", "10")
    assert denied == [], denied


def test_a_worker_cannot_touch_what_is_not_its_own(server: RedisServer, workers: None) -> None:
    alpha = redis.Redis.from_url(worker_url(server, "alpha"))
    alpha.set(names.node_alive_key("alpha"), "1", ex=5)  # its own liveness: allowed
    forbidden = [
        alpha.flushall,
        lambda: alpha.config_get("maxmemory"),
        lambda: alpha.keys("*"),
        lambda: alpha.set(names.node_alive_key("beta"), "1"),  # pose as another node
        lambda: alpha.lpop(names.node_queue("beta")),  # take another node's jobs
        lambda: alpha.hgetall(names.session_key("s-beta")),  # read a conversation
        lambda: alpha.hgetall(names.BREAKERS_HASH),
    ]
    for attempt in forbidden:
        with pytest.raises(NoPermissionError):
            attempt()


def test_the_controller_cannot_administer_the_server(server: RedisServer) -> None:
    controller = redis.Redis.from_url(controller_url(server))
    for attempt in (
        controller.flushall,
        lambda: controller.config_set("maxmemory", "1"),
        lambda: controller.keys("*"),
        lambda: controller.acl_setuser("intruder", enabled=True),
    ):
        with pytest.raises(NoPermissionError):
            attempt()


def test_a_worker_counts_rate_limits_and_records_only_its_own_providers_headers(
    server: RedisServer,
) -> None:
    alpha = redis.Redis.from_url(worker_url(server, "alpha"))
    admit = alpha.register_script(ADMIT_LUA)
    assert admit(keys=[names.RATE_COUNTERS_HASH], args=[10, 120, "anthropic", 5, 0])[0] == 1
    own = names.provider_limits_key("alpha", "claude")
    alpha.hset(own, "anthropic-ratelimit-requests-remaining", "4")
    alpha.expire(own, 60)
    with pytest.raises(NoPermissionError):
        alpha.hset(names.provider_limits_key("beta", "claude"), "x", "1")


def test_an_acl_file_from_corral_acl_is_what_redis_server_loads(tmp_path: Path) -> None:
    env = {"PW_ADMIN": "admin-secret-0a1b2c3d", "PW_PI2": PASSWORDS["alpha"]}
    printed = corral_acl(
        "acl", "--aclfile", "--admin", "PW_ADMIN", "--worker", "pi2=PW_PI2", env=env
    )
    assert printed.returncode == 0, printed.stderr
    assert "admin-secret" not in printed.stdout and PASSWORDS["alpha"] not in printed.stdout
    acl_file = tmp_path / "users.acl"
    acl_file.write_text(printed.stdout)
    # The password only lets the helper see it answer: the file's default user has the same.
    own = start_redis(password=env["PW_ADMIN"], extra_args=["--aclfile", str(acl_file)])
    try:
        # The file's default user is the admin: without its password nobody gets in.
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=own.port).ping()
        admin = redis.Redis(port=own.port, password=env["PW_ADMIN"])
        assert admin.config_get("aclfile") == {"aclfile": str(acl_file)}
        worker = redis.Redis(port=own.port, username=acl.worker_user("pi2"), password=env["PW_PI2"])
        # Its own priority lists (the separator came through the file as raw bytes) but no other's.
        queue = names.node_queue_lists("pi2")[-1]
        assert worker.rpush(queue, "x") == 1
        with pytest.raises(NoPermissionError):
            worker.rpush(names.node_queue_lists("gpu1")[-1], "x")
        with pytest.raises(NoPermissionError):
            worker.flushall()
        admin.close()
        worker.close()
    finally:
        own.stop()


def test_an_acl_file_needs_its_admin_password() -> None:
    without_admin = corral_acl("acl", "--aclfile", "--worker", "pi2=PW", env={"PW": "x" * 20})
    assert without_admin.returncode == 2
    assert "--admin" in without_admin.stderr and "Traceback" not in without_admin.stderr
