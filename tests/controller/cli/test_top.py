"""`corral top` on real parts: a redis-server with a password, two simulated workers, jobs
running, and the live mode driven through a pseudo-terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from broker.settings import build_settings
from controller.activity import BackendActivity, NodeActivity
from controller.cli.top import top_frame
from controller.client import CorralClient, make_spec
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    running_workers,
    start_redis,
    wait_until,
)

PASSWORD = "top-secret-pw-4711"
# About 20 words an answer, 40 ms a word: a job runs for about a second.
SLOW = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "40", "--capacity", "2"]
NODES = ("alpha", "beta")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = start_redis(password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(server: RedisServer, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(server.url, module_log_dir, *((name, SLOW) for name in NODES)) as workers:
        yield workers


@pytest.fixture
def client(server: RedisServer, cluster: list[WorkerProcess]) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=server.url)) as c:
        wait_until(lambda: sum(n.up for n in c.nodes()) == len(NODES), 10, "both nodes up")
        yield c


def run_jobs(client: CorralClient, per_node: int) -> tuple[ThreadPoolExecutor, list[object]]:
    """``per_node`` jobs pinned to each node at once: more than its 2 slots, so some queue."""
    pool = ThreadPoolExecutor(max_workers=per_node * len(NODES))
    futures: list[object] = [
        pool.submit(lambda n=name, i=i: list(client.stream(make_spec(f"job {i}", node=n))))
        for name in NODES
        for i in range(per_node)
    ]
    return pool, futures


def corral_env(server: RedisServer) -> dict[str, str]:
    return {**os.environ, "CORRAL_BROKER_URL": server.url, "COLUMNS": "140"}


def row_of(frame: str, name: str) -> dict[str, str]:
    """A node's row (its first backend's) by column title; cells stand 2+ spaces apart."""
    lines = frame.splitlines()
    header = next(cells(line) for line in lines if line.split()[:2] == ["node", "state"])
    row = next(cells(line) for line in lines if line.split()[:1] == [name])
    assert len(row) == len(header), frame
    return dict(zip(header, row, strict=True))


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_once_shows_each_node_its_queue_jobs_and_token_rate(
    server: RedisServer, client: CorralClient
) -> None:
    # Five rounds of two: about 4 s of work, so jobs still wait when top reads the cluster.
    pool, futures = run_jobs(client, per_node=10)
    try:
        # Wait until both nodes are busy and have jobs waiting, as their heartbeats say.
        wait_until(
            lambda: all(n.info.in_flight == 2 and n.queued > 0 for n in client.nodes()),
            15,
            "both nodes busy with jobs queued",
        )
        result = subprocess.run(
            [sys.executable, "-m", "controller", "top", "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env=corral_env(server),
            cwd=REPO_ROOT,
        )
    finally:
        pool.shutdown(wait=True)
    assert result.returncode == 0, result.stderr
    frame = result.stdout
    assert PASSWORD not in frame + result.stderr
    assert f"127.0.0.1:{server.port}" in frame and "***" in frame
    assert "nodes 2/2 up" in frame
    for name in NODES:
        row = row_of(frame, name)
        assert row["state"] == "up"
        assert int(row["queued"]) > 0, frame  # jobs wait in its queue
        assert row["jobs"] == "2/2", frame  # both slots busy
        # Tokens flow, no faster than two slots at 25 words a second each can stream.
        assert 0 < float(row["tok/s"]) <= 2 * 25 * 1.2, frame
    for future in futures:
        future.result()  # type: ignore[attr-defined]


def test_done_jobs_are_counted_and_an_idle_node_shows_no_tokens(
    server: RedisServer, client: CorralClient
) -> None:
    pool, _ = run_jobs(client, per_node=1)
    pool.shutdown(wait=True)
    # A heartbeat with nothing running counts every job that ran (in the same step).
    wait_until(
        lambda: all(n.info.in_flight == 0 and n.queued == 0 for n in client.nodes()),
        10,
        "the heartbeats to show the nodes idle",
    )
    done = {n.name: n.info.backends[0].counters.jobs_done for n in client.nodes()}
    assert all(count >= 1 for count in done.values())
    result = subprocess.run(
        [sys.executable, "-m", "controller", "top", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=corral_env(server),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    for name in NODES:
        row = row_of(result.stdout, name)
        assert int(row["done"]) == done[name] and row["failed"] == "0", result.stdout
        assert row["tok/s"] == "0.0" and row["jobs"] == "0/2", result.stdout


@pytest.mark.parametrize("leave", ["q", "ctrl-c"])
def test_live_mode_redraws_and_leaves_cleanly(
    server: RedisServer, client: CorralClient, leave: str
) -> None:
    pool: ThreadPoolExecutor | None = None
    child = pexpect.spawn(
        sys.executable,
        ["-m", "controller", "top", "--interval", "0.3"],
        env=corral_env(server),
        cwd=str(REPO_ROOT),
        dimensions=(40, 140),
        encoding="utf-8",
        timeout=20,
    )
    try:
        child.expect("corral top")
        for name in NODES:
            child.expect(name)
        # The jobs start once top is drawing (its start-up on a loaded machine can outlast
        # them), so it reads two heartbeats of busy nodes.
        pool, _ = run_jobs(client, per_node=6)
        # Redrawn: a rate appears once a second heartbeat of a busy node has been read.
        child.expect(r"\b(?:[1-9][0-9]*\.[0-9]|0\.[1-9]) tok/s")
        if leave == "q":
            child.send("q")
        else:
            child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert "Traceback" not in (child.before or "")
    finally:
        if child.isalive():
            child.terminate(force=True)
        if pool is not None:
            pool.shutdown(wait=True)


def test_top_off_a_broker_says_so_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "top", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "CORRAL_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0",
        },
        cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    assert "127.0.0.1:1" in result.stderr


def test_nodes_watch_redraws_the_nodes_table_until_q(
    server: RedisServer, client: CorralClient
) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "controller", "nodes", "--watch", "--interval", "0.3"],
        env=corral_env(server),
        cwd=str(REPO_ROOT),
        dimensions=(40, 140),
        encoding="utf-8",
        timeout=20,
    )
    try:
        for _ in range(2):  # drawn, then drawn again
            child.expect("corral nodes")
            child.expect("alpha")
            child.expect("beta")
        child.send("q")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_nodes_watch_refuses_json(server: RedisServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "nodes", "--watch", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=corral_env(server),
        cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "--watch" in result.stderr and "Traceback" not in result.stderr


def test_a_cloud_worker_shows_the_providers_it_serves_and_each_backends_quota() -> None:
    claude = BackendActivity(
        name="claude",
        kind="anthropic",
        healthy=True,
        in_flight=1,
        capacity=4,
        latency_ms=310.0,
        tokens_per_s=42.0,
        jobs_done=7,
        jobs_failed=0,
        quota_left=0.4,
    )
    nodes = [
        NodeActivity(
            "keys", True, 0, 0, 4, 0.0, (), cloud_providers=frozenset({"openai", "anthropic"})
        ),
        NodeActivity("desk", True, 0, 1, 8, 0.0, (claude,), cloud_providers=frozenset({"google"})),
    ]
    console = Console(width=160, record=True)
    console.print(top_frame(nodes, {}, "redis://127.0.0.1:6379/0", now=0.0))
    frame = console.export_text()
    assert row_of(frame, "keys")["backend"] == "cloud routes: anthropic, openai"
    assert row_of(frame, "desk")["backend"] == "claude (anthropic), 40% quota left"
    assert "cloud routes: google" in frame
