"""A ``--cloud`` worker's side of a cloud route: the adapter it builds for the route's endpoint
with its own key, kept for the next job, and a clear error for a provider it holds no key for.

A real NodeRuntime on a real redis-server runs the jobs through the Celery task's body; the
provider is the fake Anthropic Messages API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from broker import names
from broker.celery_app import make_celery_app
from broker.schemas import DoneEvent, ErrorEvent, JobAssignment, parse_event
from broker.settings import build_settings
from controller.client import make_spec
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.servers import REPO_ROOT
from worker.config import build_worker_config
from worker.runtime import NodeRuntime
from worker.tasks import register_tasks

KEY = "sk-ant-runtime-PLANTED-77aa"
MODEL = "claude-runtime"


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with running_fake_anthropic(api_key=KEY, models=[MODEL], reply="built on demand") as fake:
        yield fake


@pytest.fixture
def runtime(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeRuntime]:
    for variable in ("OPENAI_API_KEY", "MISTRAL_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    settings = build_settings(broker_url=broker_url, heartbeat_interval_s=60)
    node = NodeRuntime(settings, build_worker_config({"cloud": True}, name="edge"))
    node.start()
    yield node
    node.stop()


def run(runtime: NodeRuntime, route_url: str, backend: str) -> list[object]:
    spec = make_spec("hi", model=MODEL, route="r", route_url=route_url)
    assignment = JobAssignment(spec=spec, node="edge", backend=backend, model=MODEL)
    app = make_celery_app(runtime.settings)
    register_tasks(app, runtime)
    try:
        app.tasks[names.RUN_JOB_TASK].run(assignment.model_dump(mode="json"))
    finally:
        app.close()
    client = redis.Redis.from_url(runtime.settings.broker_url.get_secret_value())
    try:
        key = names.job_log_key(spec.job_id)
        return [parse_event(raw) for raw in client.lrange(key, 0, -1)]
    finally:
        client.close()


def test_the_route_adapter_is_built_with_the_workers_key_and_kept(
    runtime: NodeRuntime, fake: FakeAnthropic
) -> None:
    assert runtime.cloud_providers == {"anthropic"}
    assert runtime.capacity == 4  # no backend of its own: the cloud slots
    route_url = "anthropic+http://" + fake.url.removeprefix("http://")
    for _ in range(2):
        events = run(runtime, route_url, "cloud-anthropic")
        assert isinstance(events[-1], DoneEvent)
        assert events[-1].result.text == "built on demand"
        assert events[-1].result.backend == "cloud-anthropic"
    assert [h["x-api-key"] for h in fake.state.headers_seen] == [KEY, KEY]
    assert len(runtime._route_backends) == 1  # one adapter for the endpoint, reused
    assert runtime.backends == {}  # and never listed as a configured backend


def test_a_route_of_a_provider_without_a_key_here_fails_saying_what_is_missing(
    runtime: NodeRuntime,
) -> None:
    events = run(runtime, "mistral://", "cloud-mistral")
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.code == "backend_unavailable" and not error.final  # another node may serve it
    assert "--cloud" in error.message and "MISTRAL_API_KEY" in error.message
    assert KEY not in error.message


def test_a_cloud_worker_without_any_key_stops_at_start_naming_the_variables() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.pop("CORRAL_CONFIG", None)
    started = subprocess.run(
        [sys.executable, "-m", "worker", "--name", "edge", "--cloud"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "CORRAL_BROKER_URL": "redis://127.0.0.1:1/0"},
        cwd=REPO_ROOT,
    )
    assert started.returncode == 2
    assert "--cloud" in started.stderr and "ANTHROPIC_API_KEY" in started.stderr
    assert "Traceback" not in started.stderr
