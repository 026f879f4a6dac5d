"""One pub/sub connection shared by every job an asyncio client follows.

The blocking client takes a connection per followed job (a thread waits on each). An asyncio
server may follow thousands of jobs at once: here they share one subscribed connection, one
task reads it and drops each message into the inbox of the job it belongs to. A job costs a
queue and a channel name, not a socket.

If the connection drops, redis-py reconnects and resubscribes every channel; what was
published meanwhile is in each job's replay log, which the readers refill from (see
``controller.stream_core``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.exceptions
from redis.asyncio import Redis as AsyncRedis

log = logging.getLogger(__name__)


class Inbox:
    """The messages of one channel, and whether Redis has confirmed the subscription."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class JobChannels:
    """Subscribes and unsubscribes job channels on one connection and routes their messages."""

    def __init__(self, redis: AsyncRedis) -> None:
        self._pubsub = redis.pubsub()
        self._inboxes: dict[bytes, Inbox] = {}
        self._lock = asyncio.Lock()
        """Serialises commands on the shared connection (and its first connect)."""
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._inboxes)

    async def subscribe(self, channel: str) -> Inbox:
        """Send SUBSCRIBE; await ``inbox.confirmed`` for Redis's answer."""
        inbox = Inbox(channel)
        self._inboxes[channel.encode()] = inbox
        try:
            async with self._lock:
                await self._pubsub.subscribe(channel)
        except BaseException:
            self._inboxes.pop(channel.encode(), None)
            raise
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="corral-job-channels")
        return inbox

    async def unsubscribe(self, inbox: Inbox) -> None:
        if self._inboxes.get(inbox.channel.encode()) is inbox:
            del self._inboxes[inbox.channel.encode()]
        if self._closed:
            return
        with contextlib.suppress(redis.exceptions.RedisError):
            async with self._lock:
                await self._pubsub.unsubscribe(inbox.channel)

    async def aclose(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py stub gap

    async def _read(self) -> None:
        while not self._closed:
            try:
                # A blocking read (``aclose`` cancels it): a timeout would set and cancel an
                # asyncio timer around every message, a cost paid per event of every job.
                message = await self._pubsub.get_message(timeout=None)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # redis-py reconnects and resubscribes on the next read; readers refill
                # whatever was published meanwhile from the log.
                log.info("job channels: %s; reconnecting", type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            if message is None:
                continue
            inbox = self._inboxes.get(message["channel"])
            if inbox is None:
                continue  # a channel given up on, or a resubscription's confirmation
            if message["type"] == "message":
                data = message["data"]
                inbox.messages.put_nowait(data if isinstance(data, bytes) else str(data).encode())
            elif message["type"] == "subscribe" and not inbox.confirmed.done():
                inbox.confirmed.set_result(None)
