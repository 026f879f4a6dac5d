"""One job from the controller's side, across every attempt it takes.

The controller that sends a job owns its fate. It follows the stream and, when an attempt
fails (the worker says so, or the worker is lost), decides what comes next and writes it into
the stream itself: ``rerouted`` to the next candidate node, an ``interrupted`` event with the
partial text, or the final error. Everyone following the job (``corral attach``) reads the same
story from the log. Circuit breakers learn from each outcome.

The decisions are ``controller.run_core``'s; this is the blocking shell that performs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from broker.errors import RoutingError
from broker.schemas import AnyStreamEvent, JobSpec, is_terminal
from controller.dispatch import WRITES_REFUSED, refused_write
from controller.reader import JobStreamReader
from controller.router import Candidate
from controller.run_core import (
    Attempt,
    AttemptFailed,
    AttemptSucceeded,
    ChooseNext,
    Effect,
    Finished,
    RunCore,
    Send,
    Steps,
    Write,
)
from controller.stream_control import StreamControl
from controller.tracing import JobTrace

__all__ = ["Attempt", "JobHooks", "JobRun"]


class JobHooks(Protocol):
    """What a JobRun needs from its client (routing, sending, breakers, sessions)."""

    def next_candidate(self, spec: JobSpec, *, avoid: set[str], never: set[str]) -> Candidate:
        """The best place to try next, or RoutingError. Backend targets (``node/backend``) in
        ``never`` are out; those in ``avoid`` only if nothing else is left."""

    def send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None: ...

    def attempt_succeeded(self, candidate: Candidate) -> None: ...

    def attempt_failed(
        self, candidate: Candidate, code: str, retry_after: float | None = None
    ) -> None:
        """Count the failure against its breaker, or hold it open for ``retry_after``."""

    def finished(self, spec: JobSpec, result_text: str, candidate: Candidate) -> None:
        """The job is done: remember the conversation, if it has a session."""


class JobRun:
    """Follows a job and moves it on failure; iterate ``events()`` to drive it."""

    def __init__(
        self,
        *,
        spec: JobSpec,
        reader: JobStreamReader,
        control: StreamControl,
        hooks: JobHooks,
        attempt: Attempt,
        trace: JobTrace | None = None,
    ) -> None:
        self.spec = spec
        self.trace = trace or JobTrace()
        self.reader = reader
        self.control = control
        self.hooks = hooks
        self.core = RunCore(spec, reader.cursor, attempt)
        reader.on_worker_lost = self._worker_lost

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def attempt(self) -> Attempt:
        return self.core.attempt

    @property
    def candidate(self) -> Candidate:
        return self.core.candidate

    def events(self, timeout_s: float) -> Iterator[AnyStreamEvent]:
        """Every event of the job, in order, through to its end."""
        try:
            for event in self.reader.events(timeout_s):
                self.trace.event(event)
                # A job's last event is acted on (session saved, breakers told) before the
                # caller sees it: a caller may well stop reading there.
                last = is_terminal(event)
                if last:
                    self._perform_all(self.core.after(event))
                yield event
                if not last:
                    self._perform_all(self.core.after(event))
        except WRITES_REFUSED as exc:
            raise refused_write(exc) from None
        finally:
            self.trace.abandoned()  # a no-op when the job's end was seen

    def _worker_lost(self, reason: str) -> None:
        self._perform_all(self.core.on_worker_lost(reason))

    def _perform_all(self, steps: Steps) -> None:
        result: object = None
        while True:
            try:
                effect = steps.send(result)
            except StopIteration:
                return
            result = self._perform(effect)

    def _perform(self, effect: Effect) -> object:
        hooks = self.hooks
        match effect:
            case AttemptSucceeded(candidate):
                hooks.attempt_succeeded(candidate)
            case AttemptFailed(candidate, code, retry_after):
                hooks.attempt_failed(candidate, code, retry_after)
            case Finished(spec, text, candidate):
                hooks.finished(spec, text, candidate)
            case ChooseNext(spec, avoid, never):
                try:
                    moved = hooks.next_candidate(spec, avoid=set(avoid), never=set(never))
                except RoutingError as exc:
                    return exc
                self.trace.routed(moved)
                return moved
            case Write(event, attempt_seen, new_lease, old_node, refuse):
                return self.control.take_over(
                    event,
                    attempt_seen=attempt_seen,
                    new_lease=new_lease,
                    old_node=old_node,
                    refuse_if_cancelled=refuse,
                )
            case Send(spec, candidate, number):
                hooks.send(spec, candidate, number)
        return None
