"""A worker counts each backend's tokens and jobs for its heartbeat (read by `corral top`)."""

from __future__ import annotations

import asyncio

from broker.schemas import JobAssignment, JobCounters, JobResult, Timings, Usage
from controller.client import make_spec
from worker.jobs import JobControl
from worker.runtime import BackendLoad


def test_a_backend_counts_running_tokens_then_the_ended_jobs_count() -> None:
    async def scenario() -> None:
        load = BackendLoad(capacity=2)
        spec = make_spec("hi")
        control = JobControl(JobAssignment(spec=spec, node="a", backend="sim", model="m"))
        control.tokens_streamed = 7
        assert load.counters([control]).tokens_out == 7  # counted while it runs
        result = JobResult(
            job_id=spec.job_id,
            status="ok",
            node="a",
            backend="sim",
            model="m",
            text="x",
            usage=Usage(completion_tokens=9),
            timings=Timings(queued_ms=0, first_token_ms=1, total_ms=2),
        )
        load.job_ended(control, result)
        failed = JobControl(JobAssignment(spec=spec, node="a", backend="sim", model="m"))
        load.job_ended(
            failed,
            result.model_copy(update={"status": "error", "usage": Usage(completion_tokens=0)}),
        )
        counters = load.counters([])
        assert counters == JobCounters(tokens_out=9, jobs_done=1, jobs_failed=1)

    asyncio.run(scenario())  # BackendLoad holds an asyncio semaphore
