"""The job lease, worker side and controller side together, under generated interleavings.

Workers claim attempts and append tokens (``worker.stream``); controllers move the job on and
cancel it (``controller.stream_control``). Hypothesis runs them in any order against one
Redis (fakeredis's Lua), and after every step the job's log must read as one clean story:
sequence numbers equal positions, and every token comes from the one worker process whose
``started`` event is the latest, never from a worker the job has moved away from. That is the
"a job never streams twice" guarantee, stated as an invariant.
"""

from __future__ import annotations

import asyncio
import time

import fakeredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker import names
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    ErrorEvent,
    ReroutedEvent,
    StartedEvent,
    parse_event,
)
from controller.stream_control import CLOSED_LEASE, StreamControl, TakeOver
from worker.stream import Claim, Fenced, JobStream, StreamScripts

JOB = "job-under-test"
WORKERS = ("w1", "w2", "w3")


class LeaseProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = fakeredis.FakeServer()
        self.redis = fakeredis.FakeRedis(server=self.server)
        self.control = StreamControl(self.redis, ttl_s=600)
        # What each worker process believes it holds: (attempt, its stream's next seq).
        self.holding: dict[str, tuple[int, int, str]] = {}
        self.started_per_attempt: dict[int, int] = {}

    # --- the worker side (async Redis, as in the worker) ------------------------------------

    def _worker_call(self, coro_factory):  # type: ignore[no-untyped-def]
        async def run():  # type: ignore[no-untyped-def]
            redis = fakeredis.FakeAsyncRedis(server=self.server)
            try:
                return await coro_factory(StreamScripts(redis))
            finally:
                await redis.aclose()

        return asyncio.run(run())

    @rule(worker=st.sampled_from(WORKERS), attempt=st.integers(min_value=1, max_value=4))
    def a_worker_receives_a_delivery(self, worker: str, attempt: int) -> None:
        async def claim(scripts: StreamScripts) -> tuple[Claim, JobStream]:
            stream = JobStream(scripts, JOB, ttl_s=600)
            outcome = await stream.claim(
                attempt=attempt,
                claimer=worker,
                node=f"node-{worker}",
                backend="b",
                model="m",
                lease_ttl_s=600,
            )
            return outcome, stream

        outcome, stream = self._worker_call(claim)
        if outcome is Claim.STARTED:
            self.started_per_attempt[attempt] = self.started_per_attempt.get(attempt, 0) + 1
            # Keep what the stream needs to write on in a later step.
            self.holding[worker] = (attempt, stream._seq, stream._token)

    @rule(worker=st.sampled_from(WORKERS))
    def a_worker_streams_a_token(self, worker: str) -> None:
        if worker not in self.holding:
            return
        attempt, seq, token = self.holding[worker]

        async def append(scripts: StreamScripts) -> bool:
            stream = JobStream(scripts, JOB, ttl_s=600, first_seq=seq, lease_token=token)
            try:
                await stream.delta(f"{attempt}:{worker}")
            except Fenced:
                return False
            return True

        if self._worker_call(append):
            self.holding[worker] = (attempt, seq + 1, token)
        else:
            del self.holding[worker]  # fenced: the worker stops the job

    # --- the controller side ------------------------------------------------------------------

    def _lease_attempt(self) -> int | None:
        lease = self.redis.get(names.job_lease_key(JOB))
        if lease is None:
            return 1
        text = lease.decode()
        return None if text == CLOSED_LEASE else int(text.split(":")[0])

    @rule(stale=st.booleans())
    def a_controller_moves_the_job_on(self, stale: bool) -> None:
        attempt = self._lease_attempt()
        if attempt is None:
            return
        seen = attempt - 1 if stale else attempt
        event = ReroutedEvent(
            job_id=JOB,
            seq=self.redis.llen(names.job_log_key(JOB)),
            ts=time.time(),
            attempt=seen + 1,
            from_node="x",
            to_node="y",
            reason="generated",
        )
        outcome = self.control.take_over(
            event,
            attempt_seen=seen,
            new_lease=str(seen + 1),
            old_node=None,
            refuse_if_cancelled=True,
        )
        if stale:
            assert outcome is TakeOver.LEASE_MOVED
        else:
            assert outcome in (TakeOver.WRITTEN, TakeOver.CANCELLED)

    @rule()
    def somebody_cancels(self) -> None:
        self.control.cancel(JOB, None)

    # --- what must always hold ----------------------------------------------------------------

    def _log(self) -> list[AnyStreamEvent]:
        return [parse_event(raw) for raw in self.redis.lrange(names.job_log_key(JOB), 0, -1)]

    @invariant()
    def sequence_numbers_are_positions(self) -> None:
        assert [e.seq for e in self._log()] == list(range(len(self._log())))

    @invariant()
    def every_token_comes_from_the_latest_starter(self) -> None:
        writer: str | None = None
        for event in self._log():
            if isinstance(event, StartedEvent):
                writer = f"{event.attempt}:{event.instance}"
            elif isinstance(event, ReroutedEvent | ErrorEvent):
                writer = None  # moved on or over: nobody may write until the next start
            elif isinstance(event, DeltaEvent):
                assert event.text == writer, (event, writer)

    @invariant()
    def an_attempt_starts_at_most_once(self) -> None:
        assert all(count == 1 for count in self.started_per_attempt.values())

    @invariant()
    def nothing_starts_after_a_cancel_ends_the_job(self) -> None:
        log = self._log()
        ends = [i for i, e in enumerate(log) if isinstance(e, ErrorEvent) and e.final]
        if ends:
            assert not any(isinstance(e, StartedEvent) for e in log[ends[0] :])


LeaseProtocol.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_the_lease_protocol = LeaseProtocol.TestCase
