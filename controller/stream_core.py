"""The stream reader's decisions, without I/O: shared by the sync and the asyncio reader.

Feed a ``StreamCursor`` what arrived (a pub/sub payload, a slice of the replay log, the
worker's liveness value) and the time; it says what to yield, which range of the log to
refill, when the job has ended, when nothing came for too long and when the serving worker
is gone. The readers in ``controller.reader`` and ``controller.areader`` only move bytes.

Every event's sequence number is its index in the job's log, so the cursor's ``next_seq`` is
both "the next event to yield" and "where a refill starts".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from broker.errors import JobStateLost, JobTimeout, NodeLost
from broker.redis_clients import decoded
from broker.schemas import AnyStreamEvent, ReroutedEvent, StartedEvent, is_terminal, parse_event

Event = AnyStreamEvent

# How often an idle follower re-reads the replay log and checks the worker is still alive. Not
# on the hot path: events wake the follower at once; this only bounds how long a lost message
# or a dead node goes unnoticed.
IDLE_CHECK_S = 0.5
# After Redis comes back, liveness keys may have expired while every worker was cut off too:
# give them this long to heartbeat again before believing a node is dead.
RECONNECT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class LogRange:
    """An LRANGE over the job's log: ``start`` to ``stop`` inclusive (-1: to the end)."""

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Live:
    """What to do with one pub/sub payload: refill ``refill`` from the log first (a gap),
    then yield ``event`` through ``StreamCursor.take``. ``event`` None: drop the payload."""

    event: Event | None
    refill: LogRange | None = None


class IdleStep(enum.Enum):
    """What a follower does after a quiet wait and a log re-read."""

    WAIT = "wait"
    """Something arrived from the log: wait again."""
    CHECK_WORKER = "check_worker"
    """Nothing new: read the serving worker's liveness key."""


@dataclass
class StreamCursor:
    """Where a follower is in one job's stream, and where the job is."""

    job_id: str
    node: str | None
    """The node the job is on (or queued for); follows ``started`` and ``rerouted`` events."""
    instance: str | None = None
    """The worker process the job was sent to or started on; a restarted worker has a new
    one, and the jobs the old one held are gone."""
    next_seq: int = 0
    lost_grace_s: float = 5.0
    """Without an owner to act on a lost worker, how long to wait before raising NodeLost
    (the job's owner, the controller that sent it, moves it on meanwhile)."""
    finished: bool = False
    has_record: bool = False
    """The job's client wrote its node record (``job_node_key``) when sending it: that
    record disappearing means Redis lost the job's state."""
    live_from_first: bool = False
    """The subscription went out before the job did (a fresh submission), so the job's first
    event comes live: the log is read only to fill a gap in the sequence numbers, or after a
    quiet wait, not once more up front. (An attach, a late reader, starts with the log.)"""
    _redis_back_at: float = field(default=0.0, repr=False)
    _lost_since: float | None = field(default=None, repr=False)
    _deadline: float = field(default=0.0, repr=False)
    _timeout_s: float = field(default=0.0, repr=False)

    # --- events ------------------------------------------------------------------------

    def log_range(self, upto: int = -1) -> LogRange:
        """The part of the log not yet yielded (up to ``upto``)."""
        return LogRange(self.next_seq, upto)

    def from_log(self, payloads: Iterable[bytes | str]) -> Iterator[Event]:
        """Events of a log read that started at ``next_seq``, in order, up to the job's end.

        Lazily: each is taken as it is yielded, so whoever acts on one event (the job run
        notes a move's worker instance) does so before the next one is taken.
        """
        for payload in payloads:
            if self.finished:
                return
            yield self.take(parse_event(payload))

    def from_live(self, payload: bytes) -> Live:
        """Judge one pub/sub payload: a duplicate is dropped, a gap is refilled first."""
        try:
            event = parse_event(payload)
        except ValidationError:
            return Live(None)  # not ours to crash on; the log holds the valid copy
        if event.seq < self.next_seq:
            return Live(None)
        if event.seq > self.next_seq:
            return Live(event, refill=self.log_range(upto=event.seq - 1))
        return Live(event)

    def accept(self, live: Live) -> Event | None:
        """The live event to yield now (through ``take``), once any gap before it was
        refilled; None if the refill fell short (Redis was unreachable, say): the event stays
        in the log, and the next read of the log yields it in order."""
        if live.event is None or live.event.seq != self.next_seq:
            return None
        return live.event

    def take(self, event: Event) -> Event:
        """Advance past ``event`` and note where the job is now."""
        self.next_seq = event.seq + 1
        self._lost_since = None
        if isinstance(event, StartedEvent):
            self.node, self.instance = event.node, event.instance
        elif isinstance(event, ReroutedEvent):
            self.node, self.instance = event.to_node, None
        if is_terminal(event):
            self.finished = True
        return event

    # --- time --------------------------------------------------------------------------

    def start_clock(self, now: float, timeout_s: float) -> None:
        """``timeout_s`` bounds the silence between two events, not the whole job."""
        self._timeout_s = timeout_s
        self._deadline = now + timeout_s

    def progressed(self, now: float) -> None:
        self._deadline = now + self._timeout_s

    def wait_s(self, now: float) -> float:
        """How long the next quiet wait for a message may last."""
        return min(IDLE_CHECK_S, max(0.0, self._deadline - now))

    def after_idle(self, now: float, seq_before: int) -> IdleStep:
        """After a quiet wait and a log re-read: go on, check the worker, or time out."""
        if self.next_seq != seq_before:
            self.progressed(now)
            return IdleStep.WAIT
        if now >= self._deadline:
            raise JobTimeout(f"no event from job {self.job_id} for {self._timeout_s:.0f}s")
        return IdleStep.CHECK_WORKER

    # --- the serving worker ------------------------------------------------------------

    def redis_unreachable(self, now: float) -> None:
        """A read failed; liveness keys are not to be trusted for a while after."""
        self._redis_back_at = now + RECONNECT_GRACE_S

    def worker_check_due(self, now: float) -> bool:
        return self.node is not None and now >= self._redis_back_at

    def lost_reason(self, alive: bytes | str | None) -> str | None:
        """Why the serving worker is gone, from its liveness key's value; None if it is not."""
        if alive is None:
            return f"node {self.node!r} stopped heartbeating"
        if self.instance is not None and decoded(alive) != self.instance:
            return f"the worker on node {self.node!r} restarted, ending the job it was running"
        self._lost_since = None
        return None

    def state_lost(self, log_length: int, record: bytes | str | None) -> JobStateLost | None:
        """Whether Redis lost this job's state: its log is shorter than what was already
        read from it, or its node record is gone. A Redis restarted without AOF wipes both
        (and the lease, so the worker's writes are refused): waiting would only time out."""
        if self.finished:
            return None
        if log_length < self.next_seq or (self.has_record and record is None):
            return JobStateLost(
                f"Redis lost the state of job {self.job_id} (restarted without persistence?):"
                " it can no longer be followed; send it again"
            )
        return None

    def give_up(self, reason: str, now: float) -> NodeLost | None:
        """No owner acts on the lost worker: the error to raise once the grace has passed."""
        if self._lost_since is None:
            self._lost_since = now
            return None
        if now - self._lost_since >= self.lost_grace_s:
            return NodeLost(f"{reason} while job {self.job_id} was on it")
        return None
