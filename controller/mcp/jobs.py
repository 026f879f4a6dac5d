"""Jobs as the MCP tools see them: follow one to its end, fold its events into an answer.

A job the server submitted is followed by a task of its own (``JobBook``), so ``ask`` with
``wait: false`` returns at once while the job still moves to another node if its first node
fails. A job this process did not start (another terminal's, or one from before a restart) is
read from its durable stream with ``attach``, which replays the log from the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from broker.errors import CorralError, JobTimeout
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    ReroutedEvent,
    StartedEvent,
)
from controller.aclient import AsyncCorralClient
from controller.ajobrun import AsyncJobRun
from controller.mcp.describe import routing_reason

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
OnToken = Callable[["JobProgress"], Awaitable[None]]

_KEPT_FINISHED = 256
"""Finished jobs the book remembers; older ones are read back from Redis by ``attach``."""


@dataclass
class JobProgress:
    """What is known of one job so far; ``status`` says whether it is over."""

    job_id: str
    status: JobStatus = "queued"
    node: str | None = None
    model: str | None = None
    tier: str | None = None
    reason: str = ""
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    rerouted_from: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def routing(self) -> dict[str, Any]:
        return {"node": self.node, "model": self.model, "tier": self.tier, "reason": self.reason}

    def summary(self) -> dict[str, Any]:
        """``job_status``'s structured answer (the text so far is left to ``job_result``)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "tokens": self.tokens,
            "routing": self.routing(),
            "error": self.error,
        }

    def apply(self, event: AnyStreamEvent) -> None:
        match event:
            case StartedEvent(node=node, model=model, tier=tier):
                self.status, self.node, self.model = "running", node, model
                self.tier = tier or self.tier
            case DeltaEvent(text=text):
                self.parts.append(text)
                self.tokens += 1
            case ReroutedEvent(from_node=from_node):
                if from_node is not None:
                    self.rerouted_from.append(from_node)
            case DoneEvent(result=result):
                self.node, self.model = result.node, result.model
                self.parts = [result.text]
                if result.status == "ok":
                    self.status = "done"
                else:
                    self.status = "cancelled" if result.status == "cancelled" else "failed"
                    self.error = f"{result.error_code}: {result.error_message}"
            case ErrorEvent(code=code, message=message, final=True):
                self.status = "cancelled" if code == "cancelled" else "failed"
                self.error = f"{code}: {message}"
            case InterruptedEvent(code=code, message=message, partial_text=partial, final=True):
                self.status = "failed"
                self.parts = [partial]
                self.error = f"{code}: {message} (after {len(partial)} characters of answer)"
            case _:
                pass


async def fold(
    progress: JobProgress, events: AsyncIterator[AnyStreamEvent], on_token: OnToken | None
) -> JobProgress:
    """Apply every event to ``progress``; a JobError (timeout, lost node) marks it failed."""
    try:
        async for event in events:
            progress.apply(event)
            if on_token is not None and isinstance(event, DeltaEvent):
                await on_token(progress)
    except CorralError as exc:
        progress.status = "failed"
        progress.error = f"{exc.code}: {exc}"
    if not progress.finished:  # a stream that ended without a final event
        progress.status, progress.error = "failed", "the job's stream ended without a result"
    return progress


def progress_of(run: AsyncJobRun, *, pinned: bool) -> JobProgress:
    """A fresh progress record whose reason is filled in from the run once it is over."""
    candidate = run.candidate
    progress = JobProgress(
        run.job_id, node=candidate.node, model=candidate.model, tier=candidate.tier
    )
    progress.reason = routing_reason(run.candidate, pinned=pinned, rerouted_from=())
    return progress


async def follow(
    client: AsyncCorralClient, run: AsyncJobRun, *, pinned: bool, on_token: OnToken | None = None
) -> JobProgress:
    """Follow ``run`` to its end for a caller who waits; a caller who gives up (the MCP
    request is cancelled, or times out) cancels the job too, so no node generates for nobody."""
    progress = progress_of(run, pinned=pinned)
    timeout_s = client.settings.job_timeout_s
    try:
        return await _follow_into(progress, run, timeout_s, pinned=pinned, on_token=on_token)
    except BaseException:
        if not progress.finished:
            with anyio.CancelScope(shield=True):
                await client.cancel(run.job_id)
        raise


async def _follow_into(
    progress: JobProgress,
    run: AsyncJobRun,
    timeout_s: float,
    *,
    pinned: bool,
    on_token: OnToken | None = None,
) -> JobProgress:
    await fold(progress, run.events(timeout_s), on_token)
    progress.reason = routing_reason(
        run.candidate, pinned=pinned, rerouted_from=progress.rerouted_from
    )
    return progress


class JobBook:
    """The jobs this server submitted, each followed by its own task until it ends."""

    def __init__(self, client: AsyncCorralClient) -> None:
        self._client = client
        self._jobs: dict[str, tuple[JobProgress, asyncio.Task[JobProgress]]] = {}

    def start(self, run: AsyncJobRun, *, pinned: bool) -> JobProgress:
        progress = progress_of(run, pinned=pinned)
        task = asyncio.create_task(
            _follow_into(progress, run, self._client.settings.job_timeout_s, pinned=pinned),
            name=f"corral-mcp-{run.job_id}",
        )
        self._jobs[run.job_id] = (progress, task)
        self._forget_old()
        return progress

    async def status(self, job_id: str) -> JobProgress:
        """The job's state now; one this server did not start is read from its stream."""
        if job_id in self._jobs:
            return self._jobs[job_id][0]
        return await self._read_back(job_id, silence_s=0.5)

    async def result(self, job_id: str, timeout_s: float) -> JobProgress:
        """The job's state once it is over, or as it stands after ``timeout_s``."""
        if job_id in self._jobs:
            progress, task = self._jobs[job_id]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            return progress
        return await self._read_back(job_id, silence_s=timeout_s)

    async def aclose(self) -> None:
        tasks = [task for _, task in self._jobs.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_back(self, job_id: str, silence_s: float) -> JobProgress:
        """Replay the job's log from its first event until it ends or falls silent."""
        reader = await self._client.attach(job_id)  # JobError when Redis has no such job
        progress = JobProgress(job_id)
        try:
            async for event in reader.events(silence_s):
                progress.apply(event)
        except JobTimeout:
            pass  # still running: what was read so far is the answer
        except CorralError as exc:
            progress.status, progress.error = "failed", f"{exc.code}: {exc}"
        finally:
            await reader.aclose()
        progress.reason = "read back from the job's stream"
        return progress

    def _forget_old(self) -> None:
        finished = [job for job, (p, _) in self._jobs.items() if p.finished]
        for job_id in _oldest(finished, len(finished) - _KEPT_FINISHED):
            del self._jobs[job_id]


def _oldest(job_ids: Iterable[str], count: int) -> list[str]:
    return list(job_ids)[: max(count, 0)]
