"""A cloud provider behind a real worker: the normal queue, lease and stream path, key kept.

A real redis-server, a real worker process (``python -m worker``) with an ``anthropic`` backend
from corral.yaml pointed at the fake Messages API, and the real CLI. A recognisable key is
planted in the worker's environment; it must reach the provider and nothing else: no log line,
no Redis key or value, no task argument, no CLI output.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.servers import REPO_ROOT, WorkerProcess, start_worker, wait_until

PLANTED_KEY = "sk-ant-e2e-PLANTED-9c4e1b7a"
MODEL = "claude-e2e-sonnet"
REPLY = "Clouds are backends of workers too."


def corral(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "CORRAL_BROKER_URL": broker_url},
        cwd=REPO_ROOT,
    )


class RedisMonitor:
    """Every command Redis executes while it runs (MONITOR), as text: each key and value the
    worker and the CLI write, the task messages on the queues included, however short-lived."""

    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
        self._sock.sendall(b"MONITOR\r\n")
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self._sock.recv(65536):
            self._chunks.append(chunk)

    def stop(self) -> str:
        """Stop recording (once; later calls change nothing) and return what was seen."""
        if self._sock.fileno() != -1:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._reader.join(5)
            self._sock.close()
        return b"".join(self._chunks).decode(errors="replace")


def encodings_of(secret: str) -> list[str]:
    """The secret as it would read in base64 at any of the three byte alignments (kombu sends
    a task's body base64-encoded): the middle of each encoding, which the bytes around the
    secret cannot change."""
    found = [secret]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret.encode()).decode()
        found.append(encoded[4 if offset else 0 : -4])
    return found


def everything_in_redis(broker_url: str) -> str:
    """Every key and value of the worker's database, as text."""
    client = redis.Redis.from_url(broker_url)
    parts: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            value: object
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            parts.append(f"{key!r} {value!r}")
    finally:
        client.close()
    return "\n".join(parts)


@pytest.fixture
def cloud_node(
    broker_url: str, tmp_path: Path
) -> Iterator[tuple[FakeAnthropic, WorkerProcess, RedisMonitor]]:
    monitor = RedisMonitor(broker_url)  # from before the worker starts
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL], reply=REPLY) as fake:
        config = tmp_path / "corral.yaml"
        config.write_text(
            f"worker:\n  backends:\n    - kind: anthropic\n      name: claude\n"
            f"      url: {fake.url}\n"
        )
        worker = start_worker(
            broker_url,
            "cloudy",
            "--loglevel",
            "DEBUG",
            log_dir=tmp_path,
            env={"ANTHROPIC_API_KEY": PLANTED_KEY, "CORRAL_CONFIG": str(config)},
        )
        try:
            yield fake, worker, monitor
        finally:
            worker.stop()
            monitor.stop()


def test_a_job_for_a_claude_model_reaches_the_cloud_worker_and_the_key_stays_put(
    broker_url: str, cloud_node: tuple[FakeAnthropic, WorkerProcess, RedisMonitor]
) -> None:
    fake, worker, monitor = cloud_node
    nodes = corral(broker_url, "nodes")
    assert nodes.returncode == 0, nodes.stderr
    assert "cloudy" in nodes.stdout and "anthropic" in nodes.stdout

    answer = corral(broker_url, "ask", "--model", MODEL, "why are clouds backends?")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == REPLY
    assert "node cloudy" in answer.stderr and f"model {MODEL}" in answer.stderr
    assert fake.state.headers_seen[-1]["x-api-key"] == PLANTED_KEY  # the key did travel

    # The provider now refuses the key (and echoes it back): the user learns which variable
    # to check, and still never sees the key.
    fake.state.api_key = "sk-ant-rotated"
    refused = corral(broker_url, "ask", "--model", MODEL, "again?")
    assert refused.returncode == 4
    assert "ANTHROPIC_API_KEY" in refused.stderr

    wait_until(lambda: "refused the API key" in worker.log(), 5, "the refusal in the log")
    commands = monitor.stop()
    assert "corral.run_job" in commands  # the task messages went by, and the search below
    # reads their base64 bodies: the prompt, which travels only there, is found that way.
    assert any(form in commands for form in encodings_of("why are clouds backends?")[1:])
    outputs = {
        "worker log": worker.log(),
        "redis now": everything_in_redis(broker_url),
        "redis commands": commands,
        "cli": nodes.stdout + nodes.stderr + answer.stdout + answer.stderr,
        "cli after refusal": refused.stdout + refused.stderr,
    }
    for where, text in outputs.items():
        for form in encodings_of(PLANTED_KEY):
            assert form not in text, f"the key leaked into the {where}"
    # The worker runs at DEBUG, so its log holds every HTTP exchange; every Redis command of
    # the test was recorded, task messages on the queues included. The provider's 401
    # echoed the key it got, and the log shows it scrubbed:
    assert "invalid x-api-key: ***; check ANTHROPIC_API_KEY" in outputs["worker log"]


def test_a_rate_limited_provider_moves_the_job_to_the_next_node(
    broker_url: str, tmp_path: Path
) -> None:
    """Two workers front the same provider with their own keys; the one the router prefers
    (more spare capacity) is rate limited, so the job moves on before its first token."""
    with (
        running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL]) as busy,
        running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL], reply=REPLY) as free,
    ):
        workers = []
        try:
            for name, fake, capacity in (("busy", busy, 8), ("free", free, 1)):
                config = tmp_path / f"{name}.yaml"
                config.write_text(
                    f"worker:\n  backends:\n    - kind: anthropic\n      url: {fake.url}\n"
                    f"      capacity: {capacity}\n"
                )
                workers.append(
                    start_worker(
                        broker_url,
                        name,
                        log_dir=tmp_path,
                        env={"ANTHROPIC_API_KEY": PLANTED_KEY, "CORRAL_CONFIG": str(config)},
                    )
                )
            # Limited from now on: the heartbeat keeps advertising the cached model list, as a
            # real node would until its jobs find out.
            busy.state.fail_status, busy.state.fail_headers = 429, {"retry-after": "30"}
            answer = corral(broker_url, "ask", "--json", "--model", MODEL, "hello")
        finally:
            for worker in workers:
                worker.stop()
    assert answer.returncode == 0, answer.stderr
    events = [json.loads(line) for line in answer.stdout.splitlines()]
    started = [e["node"] for e in events if e["type"] == "started"]
    errors = [e for e in events if e["type"] == "error"]
    assert started == ["busy", "free"]
    assert [(e["code"], e["final"]) for e in errors] == [("rate_limited", False)]
    assert "retry after 30s" in errors[0]["message"]
    assert events[-1]["type"] == "done" and events[-1]["result"]["text"] == REPLY
    assert PLANTED_KEY not in answer.stdout + answer.stderr
