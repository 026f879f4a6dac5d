"""A job run's decisions, without I/O: shared by the sync and the asyncio job run.

The controller that sends a job owns its fate (see ``controller.jobrun``). What it does after
each event, and when the serving worker is lost, is decided here as a generator of *effects*:
it yields what it needs done (route the job again, write an event into the stream, send the
task, tell the breakers, save the session) and receives each effect's result. A shell performs
the effects with blocking calls (``JobRun``) or awaits them (``AsyncJobRun``); a test performs
them from a script, with no Redis at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

from broker.errors import NODE_FAILURE_CODES, RETRYABLE_CODES, RoutingError
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobSpec,
    ReroutedEvent,
)
from controller.dispatch import HOLDING_CODES
from controller.router import Candidate
from controller.stream_control import CLOSED_LEASE, TakeOver
from controller.stream_core import StreamCursor

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    number: int
    candidate: Candidate
    text: list[str] = field(default_factory=list)
    first_token: bool = False


# --- effects: what the core asks its shell to do ------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptSucceeded:
    """The attempt produced its first token: reset its breakers. Result: None."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """Count a failure against the node (node-level codes) or its backend, or hold the
    backend's breaker open for ``retry_after`` when its provider said so. Result: None."""

    candidate: Candidate
    code: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The job is done: remember the conversation, if it has a session. Result: None."""

    spec: JobSpec
    result_text: str
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class ChooseNext:
    """Route the job again. Result: a Candidate, or the RoutingError (returned, not raised).
    Backend targets in ``never`` are out; those in ``avoid`` only if nothing else is left."""

    spec: JobSpec
    avoid: frozenset[str]
    never: frozenset[str]


@dataclass(frozen=True, slots=True)
class Write:
    """``StreamControl.take_over`` with these arguments. Result: a TakeOver."""

    event: AnyStreamEvent
    attempt_seen: int
    new_lease: str
    old_node: str | None
    refuse_if_cancelled: bool


@dataclass(frozen=True, slots=True)
class Send:
    """Send the job's task to ``candidate``'s queue as attempt ``attempt``. Result: None."""

    spec: JobSpec
    candidate: Candidate
    attempt: int


Effect = AttemptSucceeded | AttemptFailed | Finished | ChooseNext | Write | Send
Steps = Generator[Effect, object, None]
"""A decision in progress: send each yielded effect's result back in."""

_T = TypeVar("_T")


def _expect(result: object, kind: type[_T]) -> _T:
    if not isinstance(result, kind):
        raise TypeError(f"a shell answered {type(result).__name__}, expected {kind.__name__}")
    return result


@dataclass
class RunCore:
    """One job across every attempt it takes: what to do after each event it yields."""

    spec: JobSpec
    cursor: StreamCursor
    attempt: Attempt
    failures: list[str] = field(default_factory=list)
    backend_failed: set[str] = field(default_factory=set)
    """Targets whose backend failed this job: not tried again."""
    worker_lost: set[str] = field(default_factory=set)
    """Targets whose worker was lost: tried again only if nothing else is left (a worker
    restarted by its supervisor may serve now)."""

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def candidate(self) -> Candidate:
        return self.attempt.candidate

    def after(self, event: AnyStreamEvent) -> Steps:
        """What follows ``event``, which the run has just yielded."""
        if isinstance(event, ReroutedEvent):
            if event.attempt == self.attempt.number:
                self.cursor.instance = self.candidate.instance or None
        elif isinstance(event, DeltaEvent):
            self.attempt.text.append(event.text)
            if not self.attempt.first_token:
                self.attempt.first_token = True
                yield AttemptSucceeded(self.candidate)
        elif isinstance(event, DoneEvent):
            if self.spec.kind == "embed" and event.result.status == "ok":
                # An embed job has no tokens: its answer is its first sign of a working backend.
                yield AttemptSucceeded(self.candidate)
            yield Finished(self.spec, event.result.text, self.candidate)
        elif isinstance(event, ErrorEvent | InterruptedEvent):
            counts = event.code in RETRYABLE_CODES or event.code in HOLDING_CODES
            if counts and event.attempt == self.attempt.number:
                retry_after = event.retry_after if isinstance(event, ErrorEvent) else None
                # corral's own limit refused the call: its counters, which the router reads,
                # say when the backend may take jobs again; nothing is wrong with it.
                if not (isinstance(event, ErrorEvent) and event.limit is not None):
                    yield AttemptFailed(self.candidate, event.code, retry_after)
                lost = event.code in NODE_FAILURE_CODES
                failed = self.worker_lost if lost else self.backend_failed
                failed.add(self.candidate.backend_target)
            if not event.final and event.attempt == self.attempt.number:
                self.failures.append(f"{self.candidate.node}: {event.message}")
                advice = event if isinstance(event, ErrorEvent) else None
                yield from self._move_on(event.code, event.message, failed=advice)

    def on_worker_lost(self, reason: str) -> Steps:
        """The serving (or queued-for) node is gone: end this attempt from here."""
        attempt = self.attempt
        code = "node_lost"
        message = f"{reason} (attempt {attempt.number})"
        yield AttemptFailed(attempt.candidate, code)
        self.worker_lost.add(attempt.candidate.backend_target)
        self.failures.append(f"{attempt.candidate.node}: {reason}")
        partial = "".join(attempt.text)
        attempts_left = attempt.number < self.spec.max_attempts
        if not partial:
            if attempts_left:
                yield from self._move_on(code, message)
            else:
                yield from self._write_final("attempts_exhausted", self._exhausted())
            return
        movable = attempts_left and self.spec.retry_partial
        interrupted = InterruptedEvent(
            job_id=self.job_id,
            seq=self.cursor.next_seq,
            ts=time.time(),
            code=code,
            message=message,
            node=attempt.candidate.node,
            attempt=attempt.number,
            partial_text=partial,
            final=not movable,
        )
        # Moving on, the lease goes back to "this attempt, unclaimed" first: the lost worker
        # can no longer write, and the move below is written right after the interruption.
        lease = str(attempt.number) if movable else CLOSED_LEASE
        outcome = yield from self._write(interrupted, new_lease=lease)
        if outcome is TakeOver.WRITTEN and movable:
            yield from self._move_on(code, message, seq=interrupted.seq + 1)

    def _exhausted(self) -> str:
        return f"job failed on {self.attempt.number} attempt(s): {'; '.join(self.failures)}"

    def _move_on(
        self, code: str, message: str, seq: int | None = None, failed: ErrorEvent | None = None
    ) -> Steps:
        """Send the job to the next candidate, or end it with the reason nothing is left
        (keeping the ``failed`` attempt's advice: when to come back, which limit refused it)."""
        attempt = self.attempt
        seq = self.cursor.next_seq if seq is None else seq
        if attempt.number >= self.spec.max_attempts:
            yield from self._write_final("attempts_exhausted", self._exhausted(), seq=seq)
            return
        chosen = yield ChooseNext(
            self.spec, avoid=frozenset(self.worker_lost), never=frozenset(self.backend_failed)
        )
        if isinstance(chosen, RoutingError):
            yield from self._write_final(
                code,
                f"{message}; nothing else can serve it ({chosen})",
                seq=seq,
                failed=failed,
            )
            return
        candidate = _expect(chosen, Candidate)
        # The answer's reason starts with what made the job leave the route it was on.
        left = f"{attempt.candidate.backend_target} ({attempt.candidate.tier}) failed: {message}"
        then = f"; then {candidate.reason}" if candidate.reason else ""
        candidate = candidate._replace(reason=left[:300] + then)
        number = attempt.number + 1
        rerouted = ReroutedEvent(
            job_id=self.job_id,
            seq=seq,
            ts=time.time(),
            attempt=number,
            from_node=attempt.candidate.node,
            to_node=candidate.node,
            reason=message,
        )
        outcome = yield from self._write(rerouted, new_lease=str(number))
        if outcome is not TakeOver.WRITTEN:
            return  # cancelled, or the stream moved meanwhile: decide again on what it says
        log.info(
            "job %s moved from %s to %s: %s",
            self.job_id,
            attempt.candidate.node,
            candidate.node,
            message,
        )
        self.attempt = Attempt(number, candidate)
        yield Send(self.spec, candidate, number)

    def _write_final(
        self, code: str, message: str, seq: int | None = None, failed: ErrorEvent | None = None
    ) -> Steps:
        seq = self.cursor.next_seq if seq is None else seq
        event = self._final_error(seq, code, message, failed)
        yield from self._write(event, new_lease=CLOSED_LEASE)

    def _final_error(
        self, seq: int, code: str, message: str, failed: ErrorEvent | None = None
    ) -> ErrorEvent:
        return ErrorEvent(
            job_id=self.job_id,
            seq=seq,
            ts=time.time(),
            code=code,
            message=message,
            node=self.attempt.candidate.node,
            attempt=self.attempt.number,
            final=True,
            retry_after=failed.retry_after if failed else None,
            limit=failed.limit if failed else None,
        )

    def _write(
        self, event: AnyStreamEvent, *, new_lease: str
    ) -> Generator[Effect, object, TakeOver]:
        """Append ``event`` and set the lease, unless the stream has moved on; a job cancelled
        meanwhile (checked in the same Lua step) gets its cancellation written instead."""
        outcome = yield from self._take_over(event, new_lease, refuse_if_cancelled=True)
        if outcome is TakeOver.CANCELLED:
            event = self._final_error(event.seq, "cancelled", "job cancelled")
            written = yield from self._take_over(event, CLOSED_LEASE, refuse_if_cancelled=False)
            outcome = TakeOver.CANCELLED if written is TakeOver.WRITTEN else written
        if outcome not in (TakeOver.WRITTEN, TakeOver.CANCELLED):
            log.info("job %s: stream moved on before %s was written", self.job_id, event.type)
        return outcome

    def _take_over(
        self, event: AnyStreamEvent, new_lease: str, *, refuse_if_cancelled: bool
    ) -> Generator[Effect, object, TakeOver]:
        result = yield Write(
            event,
            attempt_seen=self.attempt.number,
            new_lease=new_lease,
            old_node=self.attempt.candidate.node,
            refuse_if_cancelled=refuse_if_cancelled,
        )
        return _expect(result, TakeOver)
