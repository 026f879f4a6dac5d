"""One job from an asyncio controller's side: the asyncio shell over ``RunCore``.

It moves, interrupts and ends jobs exactly as ``controller.jobrun.JobRun`` does (the decisions
are ``controller.run_core``'s); it awaits each effect instead of blocking on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from broker.errors import RoutingError
from broker.schemas import AnyStreamEvent, JobSpec, is_terminal
from controller.areader import AsyncJobStreamReader
from controller.dispatch import WRITES_REFUSED, refused_write
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
from controller.stream_control import AsyncStreamControl
from controller.tracing import JobTrace


class AsyncJobHooks(Protocol):
    """What an AsyncJobRun needs from its client (see ``controller.jobrun.JobHooks``)."""

    async def next_candidate(
        self, spec: JobSpec, *, avoid: set[str], never: set[str]
    ) -> Candidate: ...

    async def send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None: ...

    async def attempt_succeeded(self, candidate: Candidate) -> None: ...

    async def attempt_failed(
        self, candidate: Candidate, code: str, retry_after: float | None = None
    ) -> None: ...

    async def finished(self, spec: JobSpec, result_text: str, candidate: Candidate) -> None: ...


class AsyncJobRun:
    """Follows a job and moves it on failure; iterate ``events()`` with ``async for``."""

    def __init__(
        self,
        *,
        spec: JobSpec,
        reader: AsyncJobStreamReader,
        control: AsyncStreamControl,
        hooks: AsyncJobHooks,
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

    async def events(self, timeout_s: float) -> AsyncIterator[AnyStreamEvent]:
        """Every event of the job, in order, through to its end."""
        try:
            async for event in self.reader.events(timeout_s):
                self.trace.event(event)
                # A job's last event is acted on (session saved, breakers told) before the
                # caller sees it: a caller may well stop reading there.
                last = is_terminal(event)
                if last:
                    await self._perform_all(self.core.after(event))
                yield event
                if not last:
                    await self._perform_all(self.core.after(event))
        except WRITES_REFUSED as exc:
            raise refused_write(exc) from None
        finally:
            self.trace.abandoned()  # a no-op when the job's end was seen

    async def aclose(self) -> None:
        """Stop following (the job itself goes on; ``cancel`` stops it)."""
        self.trace.abandoned()  # a no-op when the job's end was seen
        await self.reader.aclose()

    async def _worker_lost(self, reason: str) -> None:
        await self._perform_all(self.core.on_worker_lost(reason))

    async def _perform_all(self, steps: Steps) -> None:
        result: object = None
        while True:
            try:
                effect = steps.send(result)
            except StopIteration:
                return
            result = await self._perform(effect)

    async def _perform(self, effect: Effect) -> object:
        hooks = self.hooks
        match effect:
            case AttemptSucceeded(candidate):
                await hooks.attempt_succeeded(candidate)
            case AttemptFailed(candidate, code, retry_after):
                await hooks.attempt_failed(candidate, code, retry_after)
            case Finished(spec, text, candidate):
                await hooks.finished(spec, text, candidate)
            case ChooseNext(spec, avoid, never):
                try:
                    moved = await hooks.next_candidate(spec, avoid=set(avoid), never=set(never))
                except RoutingError as exc:
                    return exc
                self.trace.routed(moved)
                return moved
            case Write(event, attempt_seen, new_lease, old_node, refuse):
                return await self.control.take_over(
                    event,
                    attempt_seen=attempt_seen,
                    new_lease=new_lease,
                    old_node=old_node,
                    refuse_if_cancelled=refuse,
                )
            case Send(spec, candidate, number):
                await hooks.send(spec, candidate, number)
        return None
