"""Running one job against a backend: the plain function the Celery task wraps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from broker.errors import BackendError, BackendUnavailable, CorralError
from broker.schemas import JobAssignment, JobResult, Timings, Usage
from worker.backends.base import Backend, Chunk
from worker.stream import JobStream

log = logging.getLogger(__name__)


@dataclass
class JobControl:
    """Shared between a running job and the cancel listener."""

    assignment: JobAssignment
    cancel_requested: bool = False
    task: asyncio.Task[JobResult] | None = field(default=None, repr=False)


async def run_job(
    control: JobControl, backends: Mapping[str, Backend], stream: JobStream
) -> JobResult:
    """Stream ``control.assignment`` from its backend onto ``stream`` and return the outcome.

    Backend failures and cancellation end the stream with an error event; the result records
    them. Nothing is raised for them, so the Celery task acknowledges the job: retrying a job
    the backend refused is the controller's decision, not Celery's.
    """
    assignment = control.assignment
    spec = assignment.spec
    started_at = time.time()
    parts: list[str] = []
    first_token_at: float | None = None
    final: Chunk | None = None
    deltas = 0

    def outcome(
        status: Literal["ok", "error", "cancelled"], error: CorralError | None = None
    ) -> JobResult:
        now = time.time()
        return JobResult(
            job_id=spec.job_id,
            status=status,
            node=assignment.node,
            backend=assignment.backend,
            model=assignment.model,
            text="".join(parts),
            finish_reason=final.finish_reason if final else None,
            usage=Usage(
                prompt_tokens=final.prompt_tokens if final else None,
                completion_tokens=(
                    final.completion_tokens
                    if final and final.completion_tokens is not None
                    else deltas
                ),
            ),
            timings=Timings(
                queued_ms=max(0.0, (started_at - spec.created_at) * 1000),
                first_token_ms=(first_token_at - started_at) * 1000 if first_token_at else None,
                total_ms=max(0.0, (now - spec.created_at) * 1000),
            ),
            error_code=error.code if error else None,
            error_message=str(error) if error else None,
        )

    # The runtime's claim has already published the started event (or found a cancel).
    if control.cancel_requested:  # cancelled while it waited in the queue
        result = outcome("cancelled")
        await stream.error("cancelled", "job cancelled before it started", assignment.node, result)
        return result

    backend = backends.get(assignment.backend)
    if backend is None:
        error = BackendUnavailable(
            f"node {assignment.node!r} has no backend {assignment.backend!r}"
        )
        result = outcome("error", error)
        await stream.error(error.code, str(error), assignment.node, result)
        return result

    try:
        async for chunk in backend.stream_chat(assignment.model, spec.messages, spec.options):
            if chunk.text:
                if first_token_at is None:
                    first_token_at = time.time()
                parts.append(chunk.text)
                deltas += 1
                await stream.delta(chunk.text)
            if chunk.done:
                final = chunk
                break
    except BackendError as exc:
        log.warning("job %s failed on backend %s: %s", spec.job_id, assignment.backend, exc)
        result = outcome("error", exc)
        await stream.error(exc.code, str(exc), assignment.node, result)
        return result
    except asyncio.CancelledError:
        if not control.cancel_requested:
            raise  # the worker is shutting down: let the task be redelivered
        log.info("job %s cancelled; backend stream closed", spec.job_id)
        result = outcome("cancelled")
        await stream.error("cancelled", "job cancelled", assignment.node, result)
        return result

    result = outcome("ok")
    await stream.done(result)
    return result
