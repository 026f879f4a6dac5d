"""One prompt as several jobs at once, answers side by side (``corral ask --fanout N`` and
``corral ask --models a,b,c``).

Picking the nodes, building the jobs, folding each event into its job's state and drawing the
tables are pure functions, tested without Redis. Only ``start_jobs`` touches the cluster: a
thread per job, since a CorralClient is thread-safe for submitting and following.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from broker.errors import CorralError, JobError, error_from_code
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobSpec,
    ReroutedEvent,
    StartedEvent,
)
from controller.breaker import BreakerPhase
from controller.client import CorralClient, new_job_id
from controller.router import Candidate, NodeState, candidates_for

JobState = Literal["waiting", "queued", "running", "done", "failed", "cancelled"]

# --- which jobs ----------------------------------------------------------------------------


def distinct_node_candidates(ranked: Sequence[Candidate], count: int) -> list[Candidate]:
    """The best ``count`` candidates, at most one per node, in rank order."""
    picked: list[Candidate] = []
    seen: set[str] = set()
    for candidate in ranked:
        if candidate.node in seen:
            continue
        seen.add(candidate.node)
        picked.append(candidate)
        if len(picked) == count:
            break
    return picked


def fanout_candidates(
    spec: JobSpec,
    nodes: Sequence[NodeState],
    count: int,
    blocked: Collection[str] = (),
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> list[Candidate]:
    """The ``count`` best nodes for ``spec`` (fewer if fewer can serve it); RoutingError when
    none can. ``blocked`` holds targets behind open circuit breakers."""
    return distinct_node_candidates(candidates_for(spec, nodes, blocked, aliases=aliases), count)


@dataclass
class FanoutJob:
    """One column of the side-by-side answer, and what is known of its job so far."""

    index: int
    """1-based: the job's column."""
    label: str
    spec: JobSpec
    node: str | None = None
    backend: str | None = None
    model: str | None = None
    state: JobState = "waiting"
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    sent_at: float | None = None
    first_token_s: float | None = None
    """From sending to the first token, as the user waited for it."""
    total_s: float | None = None
    error: CorralError | None = None
    ended: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    """Set once the job's thread is done with it (see ``wait_for``)."""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def succeeded(self) -> bool:
        return self.state == "done"


def plan_fanout(client: CorralClient, spec: JobSpec, count: int) -> list[FanoutJob]:
    """Jobs for the ``count`` best nodes as the cluster is now (fewer if fewer can serve
    ``spec``); RoutingError when none can. Targets behind open breakers are left out."""
    view = client.cluster()
    phases = client.breaker_phases(view)
    blocked = {t for t, p in phases.items() if p is BreakerPhase.OPEN}
    aliases = client.settings.aliases
    return fanout_jobs(spec, fanout_candidates(spec, view.nodes, count, blocked, aliases=aliases))


def fanout_jobs(spec: JobSpec, candidates: Sequence[Candidate]) -> list[FanoutJob]:
    """A job per candidate, each held to its candidate's node with ``route``."""
    return [
        FanoutJob(
            index=i,
            label=c.node,
            spec=spec.model_copy(update={"job_id": new_job_id(), "node": c.node}),
            node=c.node,
            backend=c.backend,
            model=c.model,
        )
        for i, c in enumerate(candidates, start=1)
    ]


def model_jobs(spec: JobSpec, models: Sequence[str]) -> list[FanoutJob]:
    """A job per model (repeats dropped), each routed as ``--model`` alone would be."""
    unique = list(dict.fromkeys(models))
    return [
        FanoutJob(
            index=i,
            label=model,
            spec=spec.model_copy(update={"job_id": new_job_id(), "model": model}),
            model=model,
        )
        for i, model in enumerate(unique, start=1)
    ]


# --- what happened -------------------------------------------------------------------------


def apply_event(job: FanoutJob, event: AnyStreamEvent, now: float) -> None:
    """Fold one of the job's events into its state; ``now`` on the clock of ``sent_at``."""
    if isinstance(event, StartedEvent):
        job.node, job.backend, job.model = event.node, event.backend, event.model
        job.state = "running"
    elif isinstance(event, DeltaEvent):
        job.parts.append(event.text)
        job.tokens += 1
        if job.first_token_s is None and job.sent_at is not None:
            job.first_token_s = now - job.sent_at
    elif isinstance(event, ReroutedEvent):
        job.node, job.state = event.to_node, "queued"
    elif isinstance(event, DoneEvent):
        result = event.result
        job.node, job.backend, job.model = result.node, result.backend, result.model
        job.parts = [result.text]
        job.tokens = result.usage.completion_tokens
        job.state = "done"
        _stop_clock(job, now)
    elif isinstance(event, InterruptedEvent) and not event.final:
        job.parts, job.tokens = [], 0  # the answer restarts from scratch elsewhere
    elif isinstance(event, ErrorEvent | InterruptedEvent) and event.final:
        fail_job(job, error_from_code(event.code, event.message), now)


def fail_job(job: FanoutJob, error: CorralError, now: float) -> None:
    job.error = error
    job.state = "cancelled" if error.code == "cancelled" else "failed"
    _stop_clock(job, now)


def _stop_clock(job: FanoutJob, now: float) -> None:
    if job.sent_at is not None:
        job.total_s = now - job.sent_at


def first_failure(jobs: Sequence[FanoutJob]) -> FanoutJob | None:
    """The leftmost job that did not succeed, or None when they all did."""
    return next((job for job in jobs if not job.succeeded), None)


# --- running them --------------------------------------------------------------------------

OnEvent = Callable[[FanoutJob, AnyStreamEvent], None]
OnError = Callable[[FanoutJob, CorralError], None]


def start_jobs(
    client: CorralClient,
    jobs: Sequence[FanoutJob],
    timeout_s: float,
    *,
    on_event: OnEvent | None = None,
    on_error: OnError | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[threading.Thread]:
    """Submit and follow every job at once, a thread each; ``wait_for`` waits for them.

    Threads are daemons: after a Ctrl-C the caller cancels the jobs and need not wait for a
    thread stuck on a node that stopped answering.
    """
    threads = [
        threading.Thread(
            target=_follow,
            args=(client, job, timeout_s, on_event, on_error, clock),
            name=f"fanout-{job.index}",
            daemon=True,
        )
        for job in jobs
    ]
    for thread in threads:
        thread.start()
    return threads


def wait_for(jobs: Sequence[FanoutJob], timeout_s: float | None = None) -> bool:
    """Wait until every job's thread is done with it; False if ``timeout_s`` ran out first.

    Waits on each job's ``ended`` event in short steps, so a Ctrl-C reaches the main thread
    at once. Not ``Thread.join``: one interrupted by a Ctrl-C can leave ``is_alive()`` false
    for a thread still running (CPython's tstate lock is released on the way out).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for job in jobs:
        while not job.ended.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                return False
    return True


def cancel_jobs(client: CorralClient, jobs: Sequence[FanoutJob], wait_s: float = 5.0) -> None:
    """Cancel every job still running and give their streams ``wait_s`` to end with it."""
    for job in jobs:
        if not job.ended.is_set():
            client.cancel(job.spec.job_id)
    wait_for(jobs, wait_s)


def _follow(
    client: CorralClient,
    job: FanoutJob,
    timeout_s: float,
    on_event: OnEvent | None,
    on_error: OnError | None,
    clock: Callable[[], float],
) -> None:
    job.sent_at = clock()
    try:
        _run_one(client, job, timeout_s, on_event, on_error, clock)
    finally:
        job.ended.set()


def _run_one(
    client: CorralClient,
    job: FanoutJob,
    timeout_s: float,
    on_event: OnEvent | None,
    on_error: OnError | None,
    clock: Callable[[], float],
) -> None:
    try:
        run = client.submit(job.spec)
        job.node, job.backend, job.model = (
            run.candidate.node,
            run.candidate.backend,
            run.candidate.model,
        )
        job.state = "queued"
        for event in run.events(timeout_s):
            apply_event(job, event, clock())
            if on_event is not None:
                on_event(job, event)
    except CorralError as exc:
        fail_job(job, exc, clock())
        if on_error is not None:
            on_error(job, exc)
        return
    if not job.finished:
        # The stream ended without its last event: count it as what it is, a lost job.
        fail_job(job, JobError("the job's stream ended without a result"), clock())
