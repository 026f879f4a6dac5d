"""The Celery task around run_job, on a real redis-server, with the runtime in this process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from celery.exceptions import Reject

from broker import names
from broker.celery_app import make_celery_app
from broker.schemas import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    JobAssignment,
    JobSpec,
    parse_event,
)
from broker.settings import build_settings
from tests.support.cli import corral
from tests.support.servers import start_worker
from worker.backends.base import Chunk
from worker.backends.simulated import reply_for
from worker.config import backend_spec, build_worker_config
from worker.runtime import NodeRuntime
from worker.tasks import register_tasks


class BuggyBackend:
    """A backend adapter with a bug: it raises something that is not a BackendError."""

    name = "simulated"
    kind = "simulated"
    url = None
    capacity = 1

    async def inventory(self) -> list[object]:
        return []

    async def stream_chat(
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        yield Chunk(text="partial")
        raise RuntimeError("adapter bug")

    async def aclose(self) -> None:
        return None


@pytest.fixture
def runtime(broker_url: str) -> Iterator[NodeRuntime]:
    settings = build_settings(broker_url=broker_url, heartbeat_interval_s=60)
    config = build_worker_config(None, name="n1", backends=(backend_spec(kind="simulated"),))
    node = NodeRuntime(settings, config)
    node.start()
    yield node
    node.stop()


def run_task(runtime: NodeRuntime, payload: object) -> object:
    app = make_celery_app(runtime.settings)
    register_tasks(app, runtime)
    try:
        return app.tasks[names.RUN_JOB_TASK].run(payload)
    finally:
        app.close()


def job_log(broker_url: str, job_id: str) -> list[object]:
    client = redis.Redis.from_url(broker_url)
    try:
        return [parse_event(raw) for raw in client.lrange(names.job_log_key(job_id), 0, -1)]
    finally:
        client.close()


def assignment(job_id: str) -> JobAssignment:
    spec = JobSpec(job_id=job_id, messages=(ChatMessage(role="user", content="hi"),), created_at=0)
    return JobAssignment(spec=spec, node="n1", backend="simulated", model="sim-small")


def test_a_good_job_returns_a_short_summary(runtime: NodeRuntime, broker_url: str) -> None:
    job = assignment("job-good-0001")
    summary = run_task(runtime, job.model_dump(mode="json"))
    words = len(reply_for(job.spec.messages).split(" "))
    assert summary == {"status": "ok", "tokens": words, "error": None}
    assert isinstance(job_log(broker_url, "job-good-0001")[-1], DoneEvent)


def test_an_answer_never_reaches_the_worker_log_at_its_default_level(
    broker_url: str, tmp_path: Path
) -> None:
    """Celery logs every task's return value at INFO ("succeeded in 0.01s: ..."): the task
    returns a summary without the answer, so a prompt's answer stays out of the log."""
    prompt = "the plan for the surprise party 7f3e"
    worker = start_worker(broker_url, "quiet", "--simulate", log_dir=tmp_path)
    try:
        asked = corral(broker_url, "ask", "--json", prompt)
        assert asked.returncode == 0, asked.stderr
        [done] = [e for e in map(json.loads, asked.stdout.splitlines()) if e["type"] == "done"]
    finally:
        worker.stop()
    answer = done["result"]["text"]
    assert answer
    logged = worker.log()
    assert "succeeded in" in logged  # Celery did log the task, at the worker's default level
    assert answer not in logged
    assert prompt not in logged


def test_a_worker_side_failure_still_ends_the_clients_stream(
    runtime: NodeRuntime, broker_url: str
) -> None:
    runtime.backends["simulated"] = BuggyBackend()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="adapter bug"):
        run_task(runtime, assignment("job-buggy-0001").model_dump(mode="json"))
    log = job_log(broker_url, "job-buggy-0001")
    assert [e.seq for e in log] == list(range(len(log)))  # type: ignore[attr-defined]
    assert isinstance(log[-1], ErrorEvent)
    assert log[-1].code == "worker_error"
    assert log[-1].message == "worker error: RuntimeError"


def test_a_malformed_payload_is_rejected_and_its_client_told(
    runtime: NodeRuntime, broker_url: str
) -> None:
    with pytest.raises(Reject):
        run_task(runtime, {"spec": {"job_id": "job-bad-00001"}, "node": "n1"})
    [event] = job_log(broker_url, "job-bad-00001")
    assert isinstance(event, ErrorEvent) and event.code == "malformed"
    with pytest.raises(Reject):
        run_task(runtime, "not even a mapping")


def test_a_node_of_capacity_150_runs_150_jobs_at_once(broker_url: str) -> None:
    # The runtime's Redis pool is sized to the node's job slots (redis-py's default stops at
    # 100 connections): every job of a wide node streams to its end.
    settings = build_settings(broker_url=broker_url, heartbeat_interval_s=60)
    slow = backend_spec(kind="simulated", capacity=150, first_token_s=0.5, token_s=0)
    node = NodeRuntime(settings, build_worker_config(None, name="n1", backends=(slow,)))
    node.start()
    try:
        assert node.capacity == 150
        jobs = [assignment(f"job-wide-{i:04d}") for i in range(150)]
        with ThreadPoolExecutor(max_workers=150) as pool:
            results = list(pool.map(node.run, jobs))
        assert [r.status if r else None for r in results] == ["ok"] * 150
        for job in jobs:
            assert isinstance(job_log(broker_url, job.spec.job_id)[-1], DoneEvent)
    finally:
        node.stop()
