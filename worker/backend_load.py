"""How loaded one backend is: its job slots, what runs on it, how fast it has answered lately."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from broker.schemas import JobCounters, JobResult
from worker.jobs import JobControl

# Weight of the newest time-to-first-token in a backend's moving average: a few jobs move it.
_LATENCY_EWMA_WEIGHT = 0.3


class BackendLoad:
    """What runs on one backend now and how fast it has answered lately."""

    def __init__(self, capacity: int) -> None:
        # Never more requests at once than the backend runs in parallel: a job beyond that
        # waits here (the node's Celery pool is sized to the sum over its backends).
        self.slots = asyncio.Semaphore(capacity)
        self.in_flight = 0
        self.latency_ms: float | None = None
        self.tokens_of_ended_jobs = 0
        self.jobs_done = 0
        self.jobs_failed = 0

    def observe_first_token(self, ms: float) -> None:
        if self.latency_ms is None:
            self.latency_ms = ms
        else:
            self.latency_ms += _LATENCY_EWMA_WEIGHT * (ms - self.latency_ms)

    def job_ended(self, control: JobControl, result: JobResult | None) -> None:
        """Count a job that ran here, in the same step that drops it from the running jobs
        (so a heartbeat never counts its tokens twice or not at all)."""
        reported = result.usage.completion_tokens if result is not None else None
        # The backend's own count when it gave one, never less than what was streamed: the
        # counter only goes up, so a reader's rate is never negative.
        self.tokens_of_ended_jobs += max(control.tokens_streamed, reported or 0)
        if result is None:
            return  # another delivery owns it, or the worker is stopping: not this one's
        if result.status == "ok":
            self.jobs_done += 1
        elif result.status == "error":
            self.jobs_failed += 1

    def counters(self, running: Iterable[JobControl]) -> JobCounters:
        """Since the worker started; ``running`` are the jobs on this backend now."""
        return JobCounters(
            tokens_out=self.tokens_of_ended_jobs + sum(c.tokens_streamed for c in running),
            jobs_done=self.jobs_done,
            jobs_failed=self.jobs_failed,
        )
