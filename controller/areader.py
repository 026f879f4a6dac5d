"""Following one job's events from asyncio: the asyncio shell over ``StreamCursor``.

The same lossless stream as ``controller.reader`` (live from pub/sub, gaps refilled from the
replay log, the serving worker watched while the stream is quiet); live messages come from the
client's shared ``JobChannels`` connection instead of a connection of the job's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import redis.exceptions
from redis.asyncio import Redis as AsyncRedis

from broker import names
from controller.job_channels import Inbox, JobChannels
from controller.stream_core import Event, IdleStep, StreamCursor

_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class AsyncJobStreamReader:
    """Follows one job's events; ``events()`` is an async iterator."""

    def __init__(
        self,
        redis: AsyncRedis,
        channels: JobChannels,
        inbox: Inbox,
        job_id: str,
        node: str | None,
        *,
        lost_grace_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.cursor = StreamCursor(job_id, node, lost_grace_s=lost_grace_s)
        self.inbox = inbox
        self._channels = channels
        self.on_worker_lost: Callable[[str], Awaitable[None]] | None = None
        """Awaited (from inside ``events``) when the serving worker is gone; it may write the
        job's next event. Without it, ``events`` raises NodeLost after a grace period."""
        self._closed = False

    @property
    def job_id(self) -> str:
        return self.cursor.job_id

    @property
    def node(self) -> str | None:
        return self.cursor.node

    @property
    def next_seq(self) -> int:
        return self.cursor.next_seq

    async def events(self, timeout_s: float) -> AsyncIterator[Event]:
        """Yield every event once, in order, until the job ends; raises JobError otherwise.

        ``timeout_s`` bounds the silence between two events, not the whole job.
        """
        cursor = self.cursor
        try:
            if not cursor.live_from_first:
                for event in await self._read_log():
                    yield event
                if cursor.finished:
                    return
            cursor.start_clock(time.monotonic(), timeout_s)
            while True:
                payload = await self._next_message(cursor.wait_s(time.monotonic()))
                if payload is None:
                    before = cursor.next_seq
                    for event in await self._read_log():
                        yield event
                    if cursor.finished:
                        return
                    if cursor.after_idle(time.monotonic(), before) is IdleStep.CHECK_WORKER:
                        await self._check_worker()
                    continue
                live = cursor.from_live(payload)
                if live.refill is not None:
                    for event in await self._read_log(live.refill.stop):
                        yield event
                    if cursor.finished:
                        return
                accepted = cursor.accept(live)
                if accepted is None:
                    continue
                cursor.progressed(time.monotonic())
                yield cursor.take(accepted)
                if cursor.finished:
                    return
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._channels.unsubscribe(self.inbox)

    async def _next_message(self, wait_s: float) -> bytes | None:
        messages = self.inbox.messages
        if not messages.empty():
            return messages.get_nowait()
        try:
            async with asyncio.timeout(wait_s):
                return await messages.get()
        except TimeoutError:
            return None

    async def _read_log(self, upto: int = -1) -> Iterator[Event]:
        """The log's events from ``next_seq``; each taken only as the caller iterates."""
        span = self.cursor.log_range(upto)
        try:
            raw = await self.redis.lrange(names.job_log_key(self.job_id), span.start, span.stop)
        except _CONNECTION_ERRORS:
            self.cursor.redis_unreachable(time.monotonic())
            return iter(())
        return self.cursor.from_log(raw)

    async def _check_worker(self) -> None:
        cursor = self.cursor
        if not cursor.worker_check_due(time.monotonic()) or cursor.node is None:
            return
        try:
            # One round trip: the worker's liveness, and whether Redis still has the job.
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(names.node_alive_key(cursor.node))
            pipe.get(names.job_node_key(self.job_id))
            pipe.llen(names.job_log_key(self.job_id))
            alive, record, log_length = await pipe.execute()
        except _CONNECTION_ERRORS:
            cursor.redis_unreachable(time.monotonic())
            return
        lost = cursor.state_lost(int(log_length), record)
        if lost is not None:
            raise lost
        reason = cursor.lost_reason(alive)
        if reason is None:
            return
        if self.on_worker_lost is not None:
            await self.on_worker_lost(reason)
            return
        error = cursor.give_up(reason, time.monotonic())
        if error is not None:
            raise error
