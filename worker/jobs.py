"""Running one job against a backend: the plain function the Celery task wraps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from broker.errors import (
    RETRYABLE_CODES,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    CorralError,
)
from broker.schemas import JobAssignment, JobResult, Timings, Usage
from worker.backends.base import Backend, Chunk
from worker.stream import Claim, Fenced, JobStream

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "cancelled"]


@dataclass
class JobControl:
    """Shared between a running job and the cancel listener."""

    assignment: JobAssignment
    cancel_requested: bool = False
    tokens_streamed: int = 0
    """Text chunks sent so far: the heartbeat counts a running job's tokens before it ends,
    so a rate shows while it runs. A chunk is a token on Ollama and llama.cpp; a cloud API may
    send several in one, and the job's own token count takes over when it ends."""
    task: asyncio.Task[JobResult | None] | None = field(default=None, repr=False)


@dataclass
class _Progress:
    """What a job has produced so far, and the result it makes at any point."""

    assignment: JobAssignment
    started_at: float = field(default_factory=time.time)
    parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    final: Chunk | None = None

    def add(self, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.parts.append(text)

    def result(self, status: Status, error: CorralError | None = None) -> JobResult:
        spec, final, now = self.assignment.spec, self.final, time.time()
        completion = final.completion_tokens if final else None
        return JobResult(
            job_id=spec.job_id,
            status=status,
            node=self.assignment.node,
            backend=self.assignment.backend,
            model=self.assignment.model,
            text="".join(self.parts),
            finish_reason=final.finish_reason if final else None,
            usage=Usage(
                prompt_tokens=final.prompt_tokens if final else None,
                completion_tokens=completion if completion is not None else len(self.parts),
            ),
            timings=Timings(
                queued_ms=max(0.0, (self.started_at - spec.created_at) * 1000),
                first_token_ms=(
                    (self.first_token_at - self.started_at) * 1000 if self.first_token_at else None
                ),
                total_ms=max(0.0, (now - spec.created_at) * 1000),
            ),
            error_code=error.code if error else None,
            error_message=str(error) if error else None,
        )


async def run_job(
    control: JobControl,
    backends: Mapping[str, Backend],
    stream: JobStream,
    claim: Awaitable[Claim],
    *,
    first_token_timeout_s: float,
    refused: BackendError | None = None,
) -> JobResult | None:
    """Stream ``control.assignment`` from its backend onto ``stream`` and return the outcome.

    ``refused``: the backend must not be called (corral's own rate limit said no); the
    attempt ends with that error once claimed.

    ``claim`` is the job's lease-and-start claim (see ``JobStream.claim``); None is returned
    when this delivery may not run (another holds the lease, or the job has moved on). Backend
    failures and cancellation end the attempt with an event and are recorded in the result,
    not raised, so the Celery task acknowledges the job: retrying elsewhere is the
    controller's decision, not Celery's (which would retry on the same node).
    """
    try:
        return await _run_claimed(control, backends, stream, claim, first_token_timeout_s, refused)
    except Fenced:
        # Any write may find the job moved on (a frozen node woke up, a duplicate delivery).
        log.warning(
            "job %s moved to another node while running here; stopped",
            control.assignment.spec.job_id,
        )
        return None


async def _run_claimed(
    control: JobControl,
    backends: Mapping[str, Backend],
    stream: JobStream,
    claim: Awaitable[Claim],
    first_token_timeout_s: float,
    refused: BackendError | None,
) -> JobResult | None:
    assignment = control.assignment
    progress = _Progress(assignment)
    backend = backends.get(assignment.backend)
    chunks = (
        backend.stream_chat(assignment.model, assignment.spec.messages, assignment.spec.options)
        if backend is not None and not control.cancel_requested and refused is None
        else None
    )
    # Ask the backend for its first token while the claim is in flight: the claim's round trip
    # then hides inside the backend's time to first token instead of adding to it. If the
    # claim says no, the request is dropped, which closes its HTTP stream.
    first_chunk = asyncio.ensure_future(anext(chunks)) if chunks is not None else None
    try:
        claimed = await claim
    except BaseException:
        await _abandon(first_chunk, chunks)
        raise
    if claimed is not Claim.STARTED or control.cancel_requested:
        await _abandon(first_chunk, chunks)
        if claimed is Claim.TAKEN_ELSEWHERE:
            return None
        control.cancel_requested = True
        return await _finish(stream, progress, "cancelled", "job cancelled before it started")
    if refused is not None:
        return await _finish(stream, progress, "error", str(refused), refused)
    if chunks is None or first_chunk is None:
        error = BackendUnavailable(
            f"node {assignment.node!r} has no backend {assignment.backend!r}"
        )
        return await _finish(stream, progress, "error", str(error), error)

    try:
        chunk: Chunk | None = await _first_token(first_chunk, first_token_timeout_s, assignment)
        while chunk is not None:
            if chunk.text:
                progress.add(chunk.text)
                control.tokens_streamed += 1
                await stream.delta(chunk.text)
            if chunk.done:
                progress.final = chunk
                break
            chunk = await anext(chunks, None)
    except StopAsyncIteration:
        pass  # the backend ended without a done chunk: what came is the answer
    except BackendError as exc:
        log.warning(
            "job %s failed on backend %s: %s", assignment.spec.job_id, assignment.backend, exc
        )
        return await _finish(stream, progress, "error", str(exc), exc)
    except asyncio.CancelledError:
        if not control.cancel_requested:
            raise  # the worker is shutting down: let the job be redelivered
        log.info("job %s cancelled; backend stream closed", assignment.spec.job_id)
        return await _finish(stream, progress, "cancelled", "job cancelled")
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]

    result = progress.result("ok")
    await stream.done(result)
    return result


async def _first_token(
    first_chunk: asyncio.Future[Chunk], timeout_s: float, assignment: JobAssignment
) -> Chunk:
    """The backend's first chunk, or BackendTimeout if it takes longer than ``timeout_s``."""
    try:
        return await asyncio.wait_for(first_chunk, timeout_s)
    except TimeoutError:
        raise BackendTimeout(
            f"backend {assignment.backend!r} on node {assignment.node!r} produced no token "
            f"within {timeout_s:g}s (model {assignment.model!r})"
        ) from None


def _is_final(assignment: JobAssignment, code: str, tokens_sent: bool) -> bool:
    """Whether the controller may still move this job on after a failure with ``code``."""
    spec = assignment.spec
    may_move = code in RETRYABLE_CODES and assignment.attempt < spec.max_attempts
    return not may_move or (tokens_sent and not spec.retry_partial)


async def _finish(
    stream: JobStream,
    progress: _Progress,
    status: Status,
    message: str,
    error: CorralError | None = None,
) -> JobResult:
    """End the attempt with an error or interruption event and return the result.

    A failure after the first token is an interruption carrying the partial text. Either may
    be non-final, which tells the controller (and anyone attached) that the job may go on
    elsewhere.
    """
    assignment = progress.assignment
    result = progress.result(status, error)
    code = error.code if error is not None else "cancelled"
    tokens_sent = bool(progress.parts)
    final = status == "cancelled" or _is_final(assignment, code, tokens_sent)
    if tokens_sent and status != "cancelled":
        await stream.interrupted(
            code,
            message,
            assignment.node,
            result.text,
            result,
            attempt=assignment.attempt,
            final=final,
        )
    else:
        await stream.error(
            code,
            message,
            assignment.node,
            result,
            attempt=assignment.attempt,
            final=final,
            retry_after=error.retry_after if isinstance(error, BackendError) else None,
            limit=error.limit if isinstance(error, BackendRateLimited) else None,
        )
    return result


async def _abandon(
    first_chunk: asyncio.Future[Chunk] | None, chunks: AsyncIterator[Chunk] | None
) -> None:
    """Drop a backend request started ahead of the claim, closing its stream."""
    if first_chunk is not None:
        first_chunk.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, BackendError):
            await first_chunk
    if chunks is not None:
        await chunks.aclose()  # type: ignore[attr-defined]
