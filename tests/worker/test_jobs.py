"""run_job, the plain function behind the Celery task, on fakeredis and scripted backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence

import fakeredis
import pytest

from broker import names
from broker.catalog import Catalog, build_catalog
from broker.errors import BackendUnavailable
from broker.schemas import (
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    InterruptedEvent,
    JobAssignment,
    JobSpec,
    ModelInfo,
    StartedEvent,
    parse_event,
)
from worker.backends.base import BackendKind, Chunk
from worker.jobs import JobControl, run_job
from worker.stream import Claim, JobStream, StreamScripts

JOB = "job-0123456789"


class ScriptedBackend:
    """Yields the given chunks; raises ``fail_after`` chunks in, or waits forever at the end."""

    def __init__(
        self,
        texts: Sequence[str],
        *,
        fail_after: int | None = None,
        hang: bool = False,
        first_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
    ):
        self.texts = list(texts)
        self.fail_after = fail_after
        self.hang = hang
        self.first_delay_s = first_delay_s
        self.token_delay_s = token_delay_s
        self.calls = 0
        self.closed = False
        self.options: GenerationOptions | None = None

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
        self.options = options
        try:
            await asyncio.sleep(self.first_delay_s)
            for index, text in enumerate(self.texts):
                if self.fail_after is not None and index == self.fail_after:
                    raise BackendUnavailable("connection dropped mid-stream")
                yield Chunk(text=text)
                await asyncio.sleep(self.token_delay_s)
            if self.hang:
                await asyncio.Event().wait()
            yield Chunk(text="", done=True, finish_reason="stop", completion_tokens=len(self.texts))
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


def assignment(attempt: int = 1, **spec_fields: object) -> JobAssignment:
    spec = JobSpec(
        job_id=JOB,
        messages=(ChatMessage(role="user", content="hi"),),
        created_at=0,
        **spec_fields,  # type: ignore[arg-type]
    )
    return JobAssignment(spec=spec, node="n1", backend="scripted", model="m", attempt=attempt)


def claim_for(stream: JobStream, job: JobAssignment, claimer: str = "w1") -> Awaitable[Claim]:
    return stream.claim(
        attempt=job.attempt,
        claimer=claimer,
        node=job.node,
        backend=job.backend,
        model=job.model,
        lease_ttl_s=60,
    )


async def run(
    backend: ScriptedBackend,
    *,
    job: JobAssignment | None = None,
    cancel_after_s: float | None = None,
    lease: str | None = None,
    cancelled_before: bool = False,
    first_token_timeout_s: float = 5.0,
    move_lease_after_s: float | None = None,
    catalog: Catalog | None = None,
) -> tuple[object, list[object]]:
    redis = fakeredis.FakeAsyncRedis()
    job = job or assignment()
    if lease is not None:
        await redis.set(names.job_lease_key(JOB), lease)
    if cancelled_before:
        await redis.set(names.job_cancel_key(JOB), 1)
    stream = JobStream(StreamScripts(redis), JOB, ttl_s=60)
    control = JobControl(job)
    claim = claim_for(stream, job)
    task = asyncio.create_task(
        run_job(
            control,
            {"scripted": backend},
            stream,
            claim,
            first_token_timeout_s=first_token_timeout_s,
            catalog=catalog,
        )
    )
    control.task = task
    if cancel_after_s is not None:
        await asyncio.sleep(cancel_after_s)
        control.cancel_requested = True
        task.cancel()
    if move_lease_after_s is not None:
        await asyncio.sleep(move_lease_after_s)
        await redis.set(names.job_lease_key(JOB), str(job.attempt + 1))
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


def test_a_failure_after_the_first_token_is_an_interruption_with_the_partial_text() -> None:
    result, log = asyncio.run(run(ScriptedBackend(["a", "b", "c"], fail_after=2)))
    assert isinstance(log[-1], InterruptedEvent)
    assert log[-1].code == "backend_unavailable"
    assert log[-1].message == "connection dropped mid-stream"
    assert log[-1].partial_text == "ab"
    assert log[-1].final  # without --retry-partial nobody restarts it
    assert result.status == "error" and result.text == "ab"  # type: ignore[attr-defined]


def test_with_retry_partial_an_interruption_leaves_the_job_to_move_on() -> None:
    job = assignment(retry_partial=True)
    _, log = asyncio.run(run(ScriptedBackend(["a", "b"], fail_after=1), job=job))
    assert isinstance(log[-1], InterruptedEvent) and not log[-1].final


def test_a_failure_before_the_first_token_may_move_on_until_the_last_attempt() -> None:
    _, log = asyncio.run(run(ScriptedBackend(["a"], fail_after=0)))
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "backend_unavailable"
    assert not log[-1].final and log[-1].attempt == 1

    last = assignment(attempt=3)
    _, log = asyncio.run(run(ScriptedBackend(["a"], fail_after=0), job=last, lease="3"))
    assert isinstance(log[-1], ErrorEvent) and log[-1].final


def test_a_backend_slow_to_its_first_token_times_out_and_is_closed() -> None:
    backend = ScriptedBackend(["late"], first_delay_s=5)
    result, log = asyncio.run(run(backend, first_token_timeout_s=0.2))
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "backend_timeout"
    assert "no token within 0.2s" in log[-1].message and not log[-1].final
    assert backend.closed
    assert result.status == "error"  # type: ignore[attr-defined]


def test_a_worker_whose_job_moved_on_stops_and_writes_nothing_more() -> None:
    backend = ScriptedBackend([f"t{i}" for i in range(50)], token_delay_s=0.01)
    result, log = asyncio.run(run(backend, move_lease_after_s=0.1))
    assert result is None
    assert backend.closed
    assert isinstance(log[0], StartedEvent)
    assert all(isinstance(e, DeltaEvent) for e in log[1:])
    assert len(log) < 40  # it stopped at the first write after the lease moved


def test_only_the_attempt_the_lease_authorises_may_start() -> None:
    stale, log = asyncio.run(run(ScriptedBackend(["a"]), job=assignment(attempt=1), lease="2"))
    assert stale is None and log == []
    moved, log = asyncio.run(run(ScriptedBackend(["a"]), job=assignment(attempt=2), lease="2"))
    assert moved.text == "a"  # type: ignore[attr-defined]
    assert isinstance(log[0], StartedEvent) and log[0].attempt == 2 and log[0].instance == "w1"


def test_cancelling_stops_the_backend_stream() -> None:
    backend = ScriptedBackend(["a"], hang=True)
    result, log = asyncio.run(run(backend, cancel_after_s=0.05))
    assert backend.closed
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "cancelled"
    assert result.status == "cancelled" and result.text == "a"  # type: ignore[attr-defined]


def test_a_copy_whose_lease_is_taken_streams_nothing() -> None:
    backend = ScriptedBackend(["a"])
    result, log = asyncio.run(run(backend, lease="1:other-worker"))
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
        job = assignment().model_copy(update={"backend": backend_name})
        control = JobControl(job)
        await run_job(control, {}, stream, claim_for(stream, job), first_token_timeout_s=5)
        log = [parse_event(r) for r in await redis.lrange(names.job_log_key(JOB), 0, -1)]
        await redis.aclose()
        return log

    log = asyncio.run(go())
    assert isinstance(log[-1], ErrorEvent)
    assert log[-1].message == "node 'n1' has no backend 'missing'"


def test_effort_reaches_a_thinking_model_and_is_dropped_with_a_note_otherwise() -> None:
    thinker = build_catalog({"local": {"m": {"thinking": True}}}, None)
    backend = ScriptedBackend(["ok"])
    job = assignment(options=GenerationOptions(effort="high"))
    result, _ = asyncio.run(run(backend, job=job, catalog=thinker))
    assert backend.options is not None and backend.options.effort == "high"
    assert result.notes == ()  # type: ignore[attr-defined]

    plain = build_catalog({"local": {"m": {"thinking": False}}}, None)
    backend = ScriptedBackend(["ok"])
    result, log = asyncio.run(run(backend, job=job, catalog=plain))
    assert backend.options is not None and backend.options.effort is None
    assert result.notes == ("effort ignored: m has no reasoning control",)  # type: ignore[attr-defined]
    assert log[-1].result.notes == result.notes  # type: ignore[attr-defined]


def test_a_priced_models_result_carries_its_estimated_cost() -> None:
    priced = build_catalog(None, {"local": {"m": {"input": 1.0, "output": 2.0}}})
    result, log = asyncio.run(run(ScriptedBackend(["a", "b", "c"]), catalog=priced))
    assert result.usage.cost_usd == pytest.approx(3 * 2.0 / 1e6)  # type: ignore[attr-defined]
    assert log[-1].result.usage == result.usage  # type: ignore[attr-defined]
    unpriced, _ = asyncio.run(run(ScriptedBackend(["a"]), catalog=build_catalog(None, None)))
    assert unpriced.usage.cost_usd is None  # type: ignore[attr-defined]
