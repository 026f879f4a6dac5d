"""One job from the controller's side, across every attempt it takes.

The controller that sends a job owns its fate. It follows the stream and, when an attempt
fails (the worker says so, or the worker is lost), decides what comes next and writes it into
the stream itself: ``rerouted`` to the next candidate node, an ``interrupted`` event with the
partial text, or the final error. Everyone following the job (``corral attach``) reads the same
story from the log. Circuit breakers learn from each outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

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
from controller.reader import JobStreamReader
from controller.router import Candidate
from controller.stream_control import CLOSED_LEASE, StreamControl, TakeOver

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    number: int
    candidate: Candidate
    text: list[str] = field(default_factory=list)
    first_token: bool = False


class JobHooks(Protocol):
    """What a JobRun needs from its client (routing, sending, breakers, sessions)."""

    def next_candidate(self, spec: JobSpec, *, avoid: set[str], never: set[str]) -> Candidate:
        """The best place to try next, or RoutingError. Backend targets (``node/backend``) in
        ``never`` are out; those in ``avoid`` only if nothing else is left."""

    def send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None: ...

    def attempt_succeeded(self, candidate: Candidate) -> None: ...

    def attempt_failed(self, candidate: Candidate, code: str) -> None: ...

    def finished(self, spec: JobSpec, result_text: str, candidate: Candidate) -> None:
        """The job is done: remember the conversation, if it has a session."""


@dataclass
class JobRun:
    """Follows a job and moves it on failure; iterate ``events()`` to drive it."""

    spec: JobSpec
    reader: JobStreamReader
    control: StreamControl
    hooks: JobHooks
    attempt: Attempt
    failures: list[str] = field(default_factory=list)
    backend_failed: set[str] = field(default_factory=set)
    """Targets whose backend failed this job: not tried again."""
    worker_lost: set[str] = field(default_factory=set)
    """Targets whose worker was lost: tried again only if nothing else is left (a worker
    restarted by its supervisor may serve now)."""

    def __post_init__(self) -> None:
        self.reader.on_worker_lost = self._worker_lost

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def candidate(self) -> Candidate:
        return self.attempt.candidate

    def events(self, timeout_s: float) -> Iterator[AnyStreamEvent]:
        """Every event of the job, in order, through to its end."""
        for event in self.reader.events(timeout_s):
            yield event
            self._after(event)

    def _after(self, event: AnyStreamEvent) -> None:
        if isinstance(event, ReroutedEvent):
            if event.attempt == self.attempt.number:
                self.reader.instance = self.candidate.instance or None
        elif isinstance(event, DeltaEvent):
            self.attempt.text.append(event.text)
            if not self.attempt.first_token:
                self.attempt.first_token = True
                self.hooks.attempt_succeeded(self.candidate)
        elif isinstance(event, DoneEvent):
            self.hooks.finished(self.spec, event.result.text, self.candidate)
        elif isinstance(event, ErrorEvent | InterruptedEvent):
            if event.code in RETRYABLE_CODES and event.attempt == self.attempt.number:
                self.hooks.attempt_failed(self.candidate, event.code)
                lost = event.code in NODE_FAILURE_CODES
                failed = self.worker_lost if lost else self.backend_failed
                failed.add(self.candidate.backend_target)
            if not event.final and event.attempt == self.attempt.number:
                self.failures.append(f"{self.candidate.node}: {event.message}")
                self._move_on(event.code, event.message)

    def _worker_lost(self, reason: str) -> None:
        """The serving (or queued-for) node is gone: end this attempt from here."""
        attempt = self.attempt
        code = "node_lost"
        message = f"{reason} (attempt {attempt.number})"
        self.hooks.attempt_failed(attempt.candidate, code)
        self.worker_lost.add(attempt.candidate.backend_target)
        self.failures.append(f"{attempt.candidate.node}: {reason}")
        partial = "".join(attempt.text)
        attempts_left = attempt.number < self.spec.max_attempts
        if not partial:
            if attempts_left:
                self._move_on(code, message)
            else:
                self._write_final("attempts_exhausted", self._exhausted())
            return
        movable = attempts_left and self.spec.retry_partial
        interrupted = InterruptedEvent(
            job_id=self.job_id,
            seq=self.reader.next_seq,
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
        if self._write(interrupted, new_lease=lease) is TakeOver.WRITTEN and movable:
            self._move_on(code, message, seq=interrupted.seq + 1)

    def _exhausted(self) -> str:
        return f"job failed on {self.attempt.number} attempt(s): {'; '.join(self.failures)}"

    def _move_on(self, code: str, message: str, seq: int | None = None) -> None:
        """Send the job to the next candidate, or end it with the reason nothing is left."""
        attempt = self.attempt
        seq = self.reader.next_seq if seq is None else seq
        if attempt.number >= self.spec.max_attempts:
            self._write_final("attempts_exhausted", self._exhausted(), seq=seq)
            return
        try:
            candidate = self.hooks.next_candidate(
                self.spec, avoid=self.worker_lost, never=self.backend_failed
            )
        except RoutingError as exc:
            self._write_final(code, f"{message}; nothing else can serve it ({exc})", seq=seq)
            return
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
        if self._write(rerouted, new_lease=str(number)) is not TakeOver.WRITTEN:
            return  # cancelled, or the stream moved meanwhile: decide again on what it says
        log.info(
            "job %s moved from %s to %s: %s",
            self.job_id,
            attempt.candidate.node,
            candidate.node,
            message,
        )
        self.attempt = Attempt(number, candidate)
        self.hooks.send(self.spec, candidate, number)

    def _write_final(self, code: str, message: str, seq: int | None = None) -> None:
        event = self._final_error(self.reader.next_seq if seq is None else seq, code, message)
        self._write(event, new_lease=CLOSED_LEASE)

    def _final_error(self, seq: int, code: str, message: str) -> ErrorEvent:
        return ErrorEvent(
            job_id=self.job_id,
            seq=seq,
            ts=time.time(),
            code=code,
            message=message,
            node=self.attempt.candidate.node,
            attempt=self.attempt.number,
            final=True,
        )

    def _write(self, event: AnyStreamEvent, *, new_lease: str) -> TakeOver:
        """Append ``event`` and set the lease, unless the stream has moved on; a job cancelled
        meanwhile (checked in the same Lua step) gets its cancellation written instead."""
        outcome = self._take_over(event, new_lease, refuse_if_cancelled=True)
        if outcome is TakeOver.CANCELLED:
            event = self._final_error(event.seq, "cancelled", "job cancelled")
            written = self._take_over(event, CLOSED_LEASE, refuse_if_cancelled=False)
            outcome = TakeOver.CANCELLED if written is TakeOver.WRITTEN else written
        if outcome not in (TakeOver.WRITTEN, TakeOver.CANCELLED):
            log.info("job %s: stream moved on before %s was written", self.job_id, event.type)
        return outcome

    def _take_over(
        self, event: AnyStreamEvent, new_lease: str, *, refuse_if_cancelled: bool
    ) -> TakeOver:
        return self.control.take_over(
            event,
            attempt_seen=self.attempt.number,
            new_lease=new_lease,
            old_node=self.attempt.candidate.node,
            refuse_if_cancelled=refuse_if_cancelled,
        )
