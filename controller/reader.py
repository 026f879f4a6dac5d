"""Following one job's events: live from pub/sub, refilled from the replay log.

Streaming is lossless: every event carries a sequence number equal to its index in the job's
log, so a gap (a missed message, a reconnect, a Redis restart) is refilled by range and each
event is yielded once, in order. While the stream is quiet the reader checks that the worker
serving the job is still alive; what happens when it is not is up to ``on_worker_lost``.

This is the blocking shell: every decision is the ``StreamCursor``'s (``controller.stream_core``),
which the asyncio reader (``controller.areader``) shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import redis.exceptions
from redis import Redis
from redis.client import PubSub

from broker import names
from controller.stream_core import IDLE_CHECK_S, Event, IdleStep, StreamCursor

__all__ = ["IDLE_CHECK_S", "Event", "JobStreamReader"]


class JobStreamReader:
    """Follows one job's events from a subscribed pub/sub plus the replay log."""

    def __init__(
        self,
        redis: Redis,
        pubsub: PubSub,
        job_id: str,
        node: str | None,
        *,
        release: Callable[[PubSub, str], None] | None = None,
        lost_grace_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.pubsub = pubsub
        self.cursor = StreamCursor(job_id, node, lost_grace_s=lost_grace_s)
        self.release = release
        """Hands the subscription back for reuse on close; without it the connection is closed."""
        self.on_worker_lost: Callable[[str], None] | None = None
        """Called (from inside ``events``) when the serving worker is gone; it may write the
        job's next event. Without it, ``events`` raises NodeLost after a grace period, which
        leaves the job's owner (the controller that sent it) time to move it on."""
        self._closed = False

    @property
    def job_id(self) -> str:
        return self.cursor.job_id

    @property
    def node(self) -> str | None:
        return self.cursor.node

    @property
    def instance(self) -> str | None:
        return self.cursor.instance

    @instance.setter
    def instance(self, value: str | None) -> None:
        self.cursor.instance = value

    @property
    def next_seq(self) -> int:
        return self.cursor.next_seq

    @property
    def lost_grace_s(self) -> float:
        return self.cursor.lost_grace_s

    @lost_grace_s.setter
    def lost_grace_s(self, value: float) -> None:
        self.cursor.lost_grace_s = value

    def events(self, timeout_s: float) -> Iterator[Event]:
        """Yield every event once, in order, until the job ends; raises JobError otherwise.

        ``timeout_s`` bounds the silence between two events, not the whole job.
        """
        cursor = self.cursor
        try:
            if not cursor.live_from_first:
                yield from self._from_log()
                if cursor.finished:
                    return
            cursor.start_clock(time.monotonic(), timeout_s)
            while True:
                payload = self._next_message(cursor.wait_s(time.monotonic()))
                if payload is None:
                    before = cursor.next_seq
                    yield from self._from_log()
                    if cursor.finished:
                        return
                    if cursor.after_idle(time.monotonic(), before) is IdleStep.CHECK_WORKER:
                        self._check_worker()
                    continue
                live = cursor.from_live(payload)
                if live.refill is not None:
                    yield from self._from_log(live.refill.stop)
                    if cursor.finished:
                        return
                event = cursor.accept(live)
                if event is None:
                    continue
                cursor.progressed(time.monotonic())
                yield cursor.take(event)
                if cursor.finished:
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

    def _next_message(self, wait_s: float) -> bytes | None:
        try:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
        except redis.exceptions.ConnectionError:
            # redis-py resubscribes on the next call; whatever was missed is in the log.
            self.cursor.redis_unreachable(time.monotonic())
            time.sleep(min(wait_s, 0.2))
            return None
        if message is None or message.get("type") != "message":
            return None
        data = message["data"]
        return data if isinstance(data, bytes) else str(data).encode()

    def _from_log(self, upto: int = -1) -> Iterator[Event]:
        span = self.cursor.log_range(upto)
        try:
            raw = self.redis.lrange(names.job_log_key(self.job_id), span.start, span.stop)
        except redis.exceptions.ConnectionError:
            self.cursor.redis_unreachable(time.monotonic())
            return
        yield from self.cursor.from_log(raw)

    def _check_worker(self) -> None:
        cursor = self.cursor
        if not cursor.worker_check_due(time.monotonic()):
            return
        assert cursor.node is not None  # worker_check_due says so
        try:
            # One round trip: the worker's liveness, and whether Redis still has the job.
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(names.node_alive_key(cursor.node))
            pipe.get(names.job_node_key(self.job_id))
            pipe.llen(names.job_log_key(self.job_id))
            alive, record, log_length = pipe.execute()
        except redis.exceptions.ConnectionError:
            cursor.redis_unreachable(time.monotonic())
            return
        lost = cursor.state_lost(int(log_length), record)
        if lost is not None:
            raise lost
        reason = cursor.lost_reason(alive)
        if reason is None:
            return
        if self.on_worker_lost is not None:
            self.on_worker_lost(reason)
            return
        error = cursor.give_up(reason, time.monotonic())
        if error is not None:
            raise error
