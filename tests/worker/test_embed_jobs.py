"""run_job for embed jobs, on fakeredis with a scripted embedder: the claim, one request, the
vectors in the done event; failures, cancellation and the result size limit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import fakeredis

from broker import names
from broker.errors import BackendUnavailable
from broker.schemas import (
    DoneEvent,
    ErrorEvent,
    JobAssignment,
    JobSpec,
    ModelInfo,
    StartedEvent,
    parse_event,
)
from tests.worker.test_jobs import JOB, ScriptedBackend, claim_for
from worker.backends.base import BackendKind, Embeddings
from worker.jobs import JobControl, run_job
from worker.stream import JobStream, StreamScripts


class ScriptedEmbedder:
    """Answers one vector per input after ``delay_s``; ``fail`` or ``drop_one`` on request."""

    name = "scripted"
    kind: BackendKind = "ollama"
    url = None
    capacity = 1

    def __init__(
        self, *, delay_s: float = 0.0, fail: bool = False, drop_one: bool = False, dims: int = 3
    ) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.drop_one = drop_one
        self.dims = dims
        self.batches: list[list[str]] = []
        self.cancelled = False

    async def inventory(self) -> list[ModelInfo]:
        return [ModelInfo(name="m", loaded=True, capabilities=frozenset({"embed"}))]

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        self.batches.append(list(inputs))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise BackendUnavailable("the embedder went away")
        vectors = [[float(len(text))] * self.dims for text in inputs]
        return Embeddings(vectors[:-1] if self.drop_one else vectors, prompt_tokens=7)

    def stream_chat(self, *args: object) -> None:
        raise AssertionError("an embed job never streams a chat")

    async def aclose(self) -> None:
        return None


def embed_assignment(*inputs: str, attempt: int = 1) -> JobAssignment:
    spec = JobSpec(job_id=JOB, kind="embed", inputs=inputs, created_at=0)
    return JobAssignment(spec=spec, node="n1", backend="scripted", model="m", attempt=attempt)


async def run(
    backend: object,
    job: JobAssignment,
    *,
    cancel_after_s: float | None = None,
    timeout_s: float = 5.0,
    max_result_bytes: int = 1024 * 1024,
) -> tuple[object, list[object]]:
    redis = fakeredis.FakeAsyncRedis()
    stream = JobStream(StreamScripts(redis), JOB, ttl_s=60)
    control = JobControl(job)
    task = asyncio.create_task(
        run_job(
            control,
            {"scripted": backend},  # type: ignore[dict-item]
            stream,
            claim_for(stream, job),
            first_token_timeout_s=timeout_s,
            max_result_bytes=max_result_bytes,
        )
    )
    control.task = task
    if cancel_after_s is not None:
        await asyncio.sleep(cancel_after_s)
        control.cancel_requested = True
        task.cancel()
    result = await task
    log = [parse_event(raw) for raw in await redis.lrange(names.job_log_key(JOB), 0, -1)]
    await redis.aclose()
    return result, log


def test_an_embed_job_sends_one_batch_and_puts_the_vectors_in_done() -> None:
    backend = ScriptedEmbedder()
    result, log = asyncio.run(run(backend, embed_assignment("a", "bb", "ccc")))
    assert backend.batches == [["a", "bb", "ccc"]]
    assert [type(e) for e in log] == [StartedEvent, DoneEvent]
    done = log[-1]
    assert isinstance(done, DoneEvent) and done.result == result
    assert done.result.embeddings == ((1.0,) * 3, (2.0,) * 3, (3.0,) * 3)
    assert done.result.usage.prompt_tokens == 7 and done.result.usage.completion_tokens == 0


def test_a_failing_embedder_may_move_on_and_a_short_answer_is_a_protocol_error() -> None:
    _, log = asyncio.run(run(ScriptedEmbedder(fail=True), embed_assignment("a")))
    assert isinstance(log[-1], ErrorEvent)
    assert log[-1].code == "backend_unavailable" and not log[-1].final
    _, log = asyncio.run(run(ScriptedEmbedder(drop_one=True), embed_assignment("a", "b")))
    assert isinstance(log[-1], ErrorEvent)
    assert "answered 1 vectors for 2 inputs" in log[-1].message


def test_a_backend_that_cannot_embed_is_an_error_not_a_crash() -> None:
    _, log = asyncio.run(run(ScriptedBackend(["x"]), embed_assignment("a")))
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "backend_unavailable"
    assert "that embeds" in log[-1].message


def test_cancel_closes_the_request_and_ends_the_stream() -> None:
    backend = ScriptedEmbedder(delay_s=30)
    result, log = asyncio.run(run(backend, embed_assignment("a"), cancel_after_s=0.2))
    assert backend.cancelled
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "cancelled" and log[-1].final
    assert result.status == "cancelled"  # type: ignore[attr-defined]


def test_a_slow_embedder_times_out() -> None:
    backend = ScriptedEmbedder(delay_s=30)
    _, log = asyncio.run(run(backend, embed_assignment("a"), timeout_s=0.2))
    assert backend.cancelled
    assert isinstance(log[-1], ErrorEvent) and log[-1].code == "backend_timeout"
    assert "did not embed within 0.2s" in log[-1].message


def test_a_result_over_the_size_limit_is_refused_with_what_to_do() -> None:
    backend = ScriptedEmbedder(dims=2000)
    _, log = asyncio.run(run(backend, embed_assignment("a", "b"), max_result_bytes=10_000))
    assert isinstance(log[-1], ErrorEvent) and log[-1].final
    assert log[-1].code == "too_large"
    assert "send fewer inputs per request" in log[-1].message
