"""Following one job's events: live from pub/sub, refilled from the replay log.

Streaming is lossless: every event carries a sequence number equal to its index in the job's
log, so a gap (a missed message, a reconnect, a Redis restart) is refilled by range and each
event is yielded once, in order. While the stream is quiet the reader checks that the worker
serving the job is still alive; what happens when it is not is up to ``on_worker_lost``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis.exceptions
from pydantic import ValidationError
from redis import Redis
from redis.client import PubSub

from broker import names
from broker.errors import JobTimeout, NodeLost
from broker.schemas import AnyStreamEvent, ReroutedEvent, StartedEvent, is_terminal, parse_event

Event = AnyStreamEvent

# How often an idle follower re-reads the replay log and checks the worker is still alive. Not
# on the hot path: events wake the follower at once; this only bounds how long a lost message
# or a dead node goes unnoticed.
IDLE_CHECK_S = 0.5
# After Redis comes back, liveness keys may have expired while every worker was cut off too:
# give them this long to heartbeat again before believing a node is dead.
_RECONNECT_GRACE_S = 5.0


@dataclass
class JobStreamReader:
    """Follows one job's events from a subscribed pub/sub plus the replay log."""

    redis: Redis
    pubsub: PubSub
    job_id: str
    node: str | None
    """The node the job is on (or queued for); follows ``started`` and ``rerouted`` events."""
    instance: str | None = None
    """The worker process the job was sent to or started on; a restarted worker has a new
    one, and the jobs the old one held are gone."""
    next_seq: int = 0
    release: Callable[[PubSub, str], None] | None = field(default=None, repr=False)
    """Hands the subscription back for reuse on close; without it the connection is closed."""
    on_worker_lost: Callable[[str], None] | None = field(default=None, repr=False)
    """Called (from inside ``events``) when the serving worker is gone; it may write the
    job's next event. Without it, ``events`` raises NodeLost after a grace period, which
    leaves the job's owner (the controller that sent it) time to move it on."""
    lost_grace_s: float = 5.0
    _closed: bool = field(default=False, repr=False)
    _finished: bool = field(default=False, repr=False)
    _redis_back_at: float = field(default=0.0, repr=False)
    _lost_since: float | None = field(default=None, repr=False)

    def events(self, timeout_s: float) -> Iterator[Event]:
        """Yield every event once, in order, until the job ends; raises JobError otherwise.

        ``timeout_s`` bounds the silence between two events, not the whole job.
        """
        try:
            yield from self._from_log()
            if self._finished:
                return
            deadline = time.monotonic() + timeout_s
            while True:
                wait = min(IDLE_CHECK_S, max(0.0, deadline - time.monotonic()))
                message = self._next_message(wait)
                if message is None:
                    before = self.next_seq
                    yield from self._from_log()
                    if self._finished:
                        return
                    if self.next_seq != before:
                        deadline = time.monotonic() + timeout_s
                        continue
                    if time.monotonic() >= deadline:
                        raise JobTimeout(f"no event from job {self.job_id} for {timeout_s:.0f}s")
                    self._check_worker()
                    continue
                try:
                    event = parse_event(message)
                except ValidationError:
                    continue  # not ours to crash on; the log holds the valid copy
                if event.seq < self.next_seq:
                    continue
                if event.seq > self.next_seq:
                    yield from self._from_log(upto=event.seq - 1)
                    if self._finished:
                        return
                deadline = time.monotonic() + timeout_s
                yield self._take(event)
                if self._finished:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.release is not None:
                self.release(self.pubsub, names.job_channel(self.job_id))
            else:
                self.pubsub.close()

    def _take(self, event: Event) -> Event:
        """Advance past ``event`` and note where the job is now."""
        self.next_seq = event.seq + 1
        self._lost_since = None
        if isinstance(event, StartedEvent):
            self.node, self.instance = event.node, event.instance
        elif isinstance(event, ReroutedEvent):
            self.node, self.instance = event.to_node, None
        if is_terminal(event):
            self._finished = True
        return event

    def _next_message(self, wait_s: float) -> bytes | None:
        try:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
        except redis.exceptions.ConnectionError:
            # redis-py resubscribes on the next call; whatever was missed is in the log.
            self._redis_back_at = time.monotonic() + _RECONNECT_GRACE_S
            time.sleep(min(wait_s, 0.2))
            return None
        if message is None or message.get("type") != "message":
            return None
        data = message["data"]
        return data if isinstance(data, bytes) else str(data).encode()

    def _from_log(self, upto: int = -1) -> Iterator[Event]:
        try:
            raw = self.redis.lrange(names.job_log_key(self.job_id), self.next_seq, upto)
        except redis.exceptions.ConnectionError:
            self._redis_back_at = time.monotonic() + _RECONNECT_GRACE_S
            return
        for payload in raw:
            yield self._take(parse_event(payload))
            if self._finished:
                return

    def _check_worker(self) -> None:
        if self.node is None or time.monotonic() < self._redis_back_at:
            return
        try:
            alive = self.redis.get(names.node_alive_key(self.node))
        except redis.exceptions.ConnectionError:
            self._redis_back_at = time.monotonic() + _RECONNECT_GRACE_S
            return
        if alive is None:
            reason = f"node {self.node!r} stopped heartbeating"
        elif self.instance is not None and _text(alive) != self.instance:
            reason = f"the worker on node {self.node!r} restarted, ending the job it was running"
        else:
            self._lost_since = None
            return
        if self.on_worker_lost is not None:
            self.on_worker_lost(reason)
            return
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        elif now - self._lost_since >= self.lost_grace_s:
            raise NodeLost(f"{reason} while job {self.job_id} was on it")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
