"""Running one job against a backend: the plain function the Celery task wraps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from broker.catalog import Catalog, Price
from broker.errors import (
    RETRYABLE_CODES,
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    CorralError,
    RequestTooLarge,
)
from broker.schemas import GenerationOptions, JobAssignment, JobResult, Timings, ToolCall, Usage
from worker.backends.base import Backend, Chunk, Embeddings, embedder
from worker.backends.effort import effort_ignored_note, reasoning_control
from worker.stream import Claim, Fenced, JobStream

log = logging.getLogger(__name__)

MAX_EMBED_RESULT_BYTES = 16 * 1024 * 1024
"""The largest embed result (its JSON) a worker sends. It travels whole in one pub/sub message,
and Redis drops a subscriber whose output buffer passes 32 MiB (``client-output-buffer-limit
pubsub``, its default): on the gateway that connection carries every stream it follows."""

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
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    first_token_at: float | None = None
    final: Chunk | None = None
    price: Price | None = None
    """What the model's tokens cost (None: local or unpriced)."""
    notes: tuple[str, ...] = ()
    embedded: Embeddings | None = None
    """An embed job's answer."""

    def add(self, chunk: Chunk) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        if chunk.text:
            self.parts.append(chunk.text)
        if chunk.reasoning:
            self.reasoning.append(chunk.reasoning)
        self.tool_calls.extend(chunk.tool_calls)

    @property
    def produced(self) -> bool:
        """Whether anything reached the stream (a client may have shown it)."""
        return bool(self.parts or self.reasoning or self.tool_calls)

    def finish_reason(self) -> str | None:
        reason = self.final.finish_reason if self.final else None
        # Ollama says "stop" after a tool call; OpenAI's clients look for "tool_calls".
        return "tool_calls" if self.tool_calls and reason in (None, "stop") else reason

    def result(self, status: Status, error: CorralError | None = None) -> JobResult:
        spec, final, now = self.assignment.spec, self.final, time.time()
        completion = final.completion_tokens if final else None
        embedded = self.embedded
        prompt_tokens = final.prompt_tokens if final else None
        if embedded is not None:
            prompt_tokens = embedded.prompt_tokens
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion if completion is not None else len(self.parts),
        )
        if self.price is not None:
            usage = usage.model_copy(update={"cost_usd": round(self.price.cost(usage), 8)})
        return JobResult(
            job_id=spec.job_id,
            status=status,
            node=self.assignment.node,
            backend=self.assignment.backend,
            model=self.assignment.model,
            text="".join(self.parts),
            finish_reason=self.finish_reason(),
            usage=usage,
            timings=Timings(
                queued_ms=max(0.0, (self.started_at - spec.created_at) * 1000),
                first_token_ms=(
                    (self.first_token_at - self.started_at) * 1000 if self.first_token_at else None
                ),
                total_ms=max(0.0, (now - spec.created_at) * 1000),
            ),
            error_code=error.code if error else None,
            error_message=str(error) if error else None,
            tier=self.assignment.tier,
            reason=self.assignment.reason,
            notes=self.notes,
            tool_calls=tuple(self.tool_calls),
            reasoning="".join(self.reasoning),
            embeddings=tuple(tuple(v) for v in embedded.vectors) if embedded else (),
        )


async def run_job(
    control: JobControl,
    backends: Mapping[str, Backend],
    stream: JobStream,
    claim: Awaitable[Claim],
    *,
    first_token_timeout_s: float,
    catalog: Catalog | None = None,
    missing_reason: str | None = None,
    max_result_bytes: int = MAX_EMBED_RESULT_BYTES,
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
    ``catalog`` prices the tokens and says which models have a reasoning control: without
    one, the job's ``effort`` is dropped before the backend sees it, and the result says so.
    ``missing_reason``: why ``backends`` lacks the job's backend, for its error.
    """
    try:
        return await _run_claimed(
            control,
            backends,
            stream,
            claim,
            first_token_timeout_s,
            catalog=catalog,
            missing_reason=missing_reason,
            max_result_bytes=max_result_bytes,
            refused=refused,
        )
    except Fenced:
        # Any write may find the job moved on (a frozen node woke up, a duplicate delivery).
        log.warning(
            "job %s moved to another node while running here; stopped",
            control.assignment.spec.job_id,
        )
        return None
    except Exception:
        # The worker reports an unexpected failure after the end of the job's log (see
        # LoopRuntime._report_error): the tokens still queued must be there first.
        await stream.settle()
        raise


async def _run_claimed(
    control: JobControl,
    backends: Mapping[str, Backend],
    stream: JobStream,
    claim: Awaitable[Claim],
    first_token_timeout_s: float,
    catalog: Catalog | None,
    missing_reason: str | None,
    max_result_bytes: int,
    refused: BackendError | None,
) -> JobResult | None:
    assignment = control.assignment
    if assignment.spec.kind == "embed":
        return await _run_embed(
            control, backends, stream, claim, first_token_timeout_s, max_result_bytes
        )
    progress = _Progress(assignment)
    backend = backends.get(assignment.backend)
    options = assignment.spec.options
    if backend is not None and catalog is not None:
        progress.price = catalog.price(backend.kind, assignment.model)
        options, progress.notes = _effort_for(options, backend, assignment.model, catalog)
    chunks = (
        _open_stream(backend, assignment, options)
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
            missing_reason or f"node {assignment.node!r} has no backend {assignment.backend!r}"
        )
        return await _finish(stream, progress, "error", str(error), error)

    try:
        chunk: Chunk | None = await _first_token(first_chunk, first_token_timeout_s, assignment)
        while chunk is not None:
            if chunk.text or chunk.reasoning or chunk.tool_calls:
                progress.add(chunk)
                control.tokens_streamed += 1
                # Queued, not awaited: the backend is read on while the write is in flight,
                # and what is ready by the writer's turn (an instant backend's done, the rest
                # of a burst) goes out in the same script call.
                await stream.delta(
                    chunk.text, reasoning=chunk.reasoning, tool_calls=chunk.tool_calls, wait=False
                )
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


def _effort_for(
    options: GenerationOptions, backend: Backend, model: str, catalog: Catalog
) -> tuple[GenerationOptions, tuple[str, ...]]:
    """``options`` as the backend should get them, and the notes for the result."""
    if options.effort is None or reasoning_control(backend.kind, model, catalog):
        return options, ()
    return options.model_copy(update={"effort": None}), (effort_ignored_note(model),)


def _open_stream(
    backend: Backend, assignment: JobAssignment, options: GenerationOptions
) -> AsyncIterator[Chunk]:
    spec = assignment.spec
    if spec.tools:
        return backend.stream_chat(assignment.model, spec.messages, options, tools=spec.tools)
    # Without tools, the three-argument call every backend (and test double) has always taken.
    return backend.stream_chat(assignment.model, spec.messages, options)


async def _run_embed(
    control: JobControl,
    backends: Mapping[str, Backend],
    stream: JobStream,
    claim: Awaitable[Claim],
    timeout_s: float,
    max_result_bytes: int,
) -> JobResult | None:
    """An embed job: the same claim, lease and cancel path as a chat, one request and no
    tokens to stream; the vectors travel in the done event. ``timeout_s`` bounds the request."""
    assignment = control.assignment
    spec = assignment.spec
    progress = _Progress(assignment)
    claimed = await claim
    if claimed is not Claim.STARTED or control.cancel_requested:
        if claimed is Claim.TAKEN_ELSEWHERE:
            return None
        control.cancel_requested = True
        return await _finish(stream, progress, "cancelled", "job cancelled before it started")
    backend = backends.get(assignment.backend)
    able = embedder(backend) if backend is not None else None
    if able is None:
        error = BackendUnavailable(
            f"node {assignment.node!r} has no backend {assignment.backend!r} that embeds"
        )
        return await _finish(stream, progress, "error", str(error), error)
    try:
        try:
            embedded = await asyncio.wait_for(able.embed(assignment.model, spec.inputs), timeout_s)
        except TimeoutError:
            raise BackendTimeout(
                f"backend {assignment.backend!r} on node {assignment.node!r} did not embed "
                f"within {timeout_s:g}s (model {assignment.model!r})"
            ) from None
        if len(embedded.vectors) != len(spec.inputs):
            raise BackendProtocolError(
                f"backend {assignment.backend!r} answered {len(embedded.vectors)} vectors "
                f"for {len(spec.inputs)} inputs"
            )
    except BackendError as exc:
        log.warning("embed job %s failed on %s: %s", spec.job_id, assignment.backend, exc)
        return await _finish(stream, progress, "error", str(exc), exc)
    except asyncio.CancelledError:
        if not control.cancel_requested:
            raise  # the worker is shutting down: let the job be redelivered
        log.info("embed job %s cancelled; backend request closed", spec.job_id)
        return await _finish(stream, progress, "cancelled", "job cancelled")
    progress.first_token_at = time.time()
    progress.embedded = embedded
    result = progress.result("ok")
    size = len(result.model_dump_json())
    if size > max_result_bytes:
        progress.embedded = None
        too_large = RequestTooLarge(
            f"the {len(spec.inputs)} vectors take {size / 1024 / 1024:.1f} MiB, over the "
            f"{max_result_bytes / 1024 / 1024:.0f} MiB an embed result may take: send fewer "
            "inputs per request"
        )
        return await _finish(stream, progress, "error", str(too_large), too_large)
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
    tokens_sent = progress.produced
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
