"""run_job, the plain function behind the Celery task, on fakeredis and scripted backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import fakeredis
import pytest

from broker import names
from broker.errors import BackendUnavailable
from broker.schemas import (
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    JobAssignment,
    JobSpec,
    ModelInfo,
    StartedEvent,
    parse_event,
)
from worker.backends.base import BackendKind, Chunk
from worker.jobs import JobControl, run_job
from worker.stream import JobStream, StreamScripts

JOB = "job-0123456789"


class ScriptedBackend:
    """Yields the given chunks; raises ``fail_after`` chunks in, or waits forever at the end."""

    def __init__(self, texts: Sequence[str], *, fail_after: int | None = None, hang: bool = False):
        self.texts = list(texts)
        self.fail_after = fail_after
        self.hang = hang
        self.calls = 0
        self.closed = False

    name = "scripted"
    kind: BackendKind = "ollama"
    url = None
    capacity = 1

    async def inventory(self) -> list[ModelInfo]:
        return [ModelInfo(name="m", loaded=True)]

    async def stream_chat(
        self, model: str, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[Chunk]:
        self.calls += 1
        try:
            for index, text in enumerate(self.texts):
                if self.fail_after is not None and index == self.fail_after:
                    raise BackendUnavailable("connection dropped mid-stream")
                yield Chunk(text=text)
                await asyncio.sleep(0)
            if self.hang:
                await asyncio.Event().wait()
            yield Chunk(text="", done=True, finish_reason="stop", completion_tokens=len(self.texts))
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


def assignment() -> JobAssignment:
    spec = JobSpec(job_id=JOB, messages=(ChatMessage(role="user", content="hi"),), created_at=0)
    return JobAssignment(spec=spec, node="n1", backend="scripted", model="m")


async def run(
    backend: ScriptedBackend,
    *,
    cancel_after_s: float | None = None,
    lease_taken: bool = False,
    cancelled_before: bool = False,
) -> tuple[object, list[object]]:
    redis = fakeredis.FakeAsyncRedis()
    if lease_taken:
        await redis.set(names.job_lease_key(JOB), "other-node")
    if cancelled_before:
        await redis.set(names.job_cancel_key(JOB), 1)
    stream = JobStream(StreamScripts(redis), JOB, ttl_s=60)
    control = JobControl(assignment())
    claim = stream.claim("n1", "scripted", "m", lease_ttl_s=60)
    task = asyncio.create_task(run_job(control, {"scripted": backend}, stream, claim))
    control.task = task
    if cancel_after_s is not None:
        await asyncio.sleep(cancel_after_s)
        control.cancel_requested = True
        task.cancel()
    result = await task
    log = [parse_event(raw) for raw in await redis.lrange(names.job_log_key(JOB), 0, -1)]
    await redis.aclose()
    return result, log


def test_a_good_job_logs_started_deltas_done_in_sequence() -> None:
    result, log = asyncio.run(run(ScriptedBackend(["Hel", "lo"])))
    assert [type(e) for e in log] == [StartedEvent, DeltaEvent, DeltaEvent, DoneEvent]
    assert [e.seq for e in log] == [0, 1, 2, 3]  # type: ignore[attr-defined]
    assert result.text == "Hello"  # type: ignore[attr-defined]
    assert log[-1].result == result  # type: ignore[attr-defined]


def test_a_backend_failure_ends_the_stream_with_its_error_and_keeps_the_partial_text() -> None:
    result, log = asyncio.run(run(ScriptedBackend(["a", "b", "c"], fail_after=2)))
    assert isinstance(log[-1], ErrorEvent)
    assert log[-1].code == "backend_unavailable"
    assert log[-1].message == "connection dropped mid-stream"
    assert result.status == "error" and result.text == "ab"  # type: ignore[attr-defined]


def test_cancelling_stops_the_backend_stream() -> None:
    backend = ScriptedBackend(["a"], hang=True)
    result, log = asyncio.run(run(backend, cancel_after_s=0.05))
    assert backend.closed
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "cancelled"
    assert result.status == "cancelled" and result.text == "a"  # type: ignore[attr-defined]


def test_a_copy_whose_lease_is_taken_streams_nothing() -> None:
    backend = ScriptedBackend(["a"])
    result, log = asyncio.run(run(backend, lease_taken=True))
    assert result is None
    assert log == []
    assert backend.closed  # the request started ahead of the claim was dropped


def test_a_job_cancelled_in_the_queue_reports_cancelled_without_output() -> None:
    result, log = asyncio.run(run(ScriptedBackend(["a"]), cancelled_before=True))
    assert len(log) == 1 and isinstance(log[0], ErrorEvent)
    assert log[0].code == "cancelled" and log[0].seq == 0
    assert result.status == "cancelled"  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend_name", ["missing"])
def test_an_unknown_backend_is_a_backend_error(backend_name: str) -> None:
    async def go() -> list[object]:
        redis = fakeredis.FakeAsyncRedis()
        stream = JobStream(StreamScripts(redis), JOB, ttl_s=60)
        control = JobControl(assignment().model_copy(update={"backend": backend_name}))
        claim = stream.claim("n1", backend_name, "m", lease_ttl_s=60)
        await run_job(control, {}, stream, claim)
        log = [parse_event(r) for r in await redis.lrange(names.job_log_key(JOB), 0, -1)]
        await redis.aclose()
        return log

    log = asyncio.run(go())
    assert isinstance(log[-1], ErrorEvent)
    assert log[-1].message == "node 'n1' has no backend 'missing'"
