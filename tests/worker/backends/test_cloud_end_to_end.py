"""A cloud provider behind a real worker: the normal queue, lease and stream path, key kept.

A real redis-server, a real worker process (``python -m worker``) with an ``anthropic`` backend
from corral.yaml pointed at the fake Messages API, and the real CLI. A recognisable key is
planted in the worker's environment; it must reach the provider and nothing else: no log line,
no Redis key or value, no task argument, no CLI output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.cli import corral
from tests.support.secret_scan import RedisMonitor, encodings_of, everything_in_redis
from tests.support.servers import WorkerProcess, start_worker, wait_until

PLANTED_KEY = "sk-ant-e2e-PLANTED-9c4e1b7a"
MODEL = "claude-e2e-sonnet"
REPLY = "Clouds are backends of workers too."


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
