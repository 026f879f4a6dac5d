"""Publishing a job's StreamEvents: live on pub/sub, kept in a replay log, in one round trip.

Each event is appended to a Redis list (index == sequence number) and published on the job's
channel in the same pipeline, so a subscriber that misses a message can refill the gap from the
list by range, and a late one can read it all.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from broker import names
from broker.schemas import DeltaEvent, DoneEvent, ErrorEvent, JobResult, StartedEvent

AnyEvent = StartedEvent | DeltaEvent | DoneEvent | ErrorEvent


class JobStream:
    """The single writer of one job's event stream (the lease guarantees it is single)."""

    def __init__(self, redis: Redis, job_id: str, ttl_s: int) -> None:
        self._redis = redis
        self._job_id = job_id
        self._ttl_s = ttl_s
        self._seq = 0
        self._log_key = names.job_log_key(job_id)
        self._channel = names.job_channel(job_id)

    @property
    def events_sent(self) -> int:
        return self._seq

    async def started(self, node: str, backend: str, model: str) -> None:
        await self._send(
            StartedEvent(
                job_id=self._job_id, seq=self._seq, ts=time.time(),
                node=node, backend=backend, model=model,
            )
        )

    async def delta(self, text: str) -> None:
        await self._send(DeltaEvent(job_id=self._job_id, seq=self._seq, ts=time.time(), text=text))

    async def done(self, result: JobResult) -> None:
        await self._send(
            DoneEvent(job_id=self._job_id, seq=self._seq, ts=time.time(), result=result),
            result=result,
        )

    async def error(self, code: str, message: str, node: str | None, result: JobResult | None) -> None:
        await self._send(
            ErrorEvent(
                job_id=self._job_id, seq=self._seq, ts=time.time(),
                code=code, message=message, node=node,
            ),
            result=result,
        )

    async def _send(self, event: AnyEvent, result: JobResult | None = None) -> None:
        payload = event.model_dump_json()
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(self._log_key, payload)
        pipe.publish(self._channel, payload)
        # The expiry is set on the first and the last event only: one command fewer per token.
        if event.seq == 0 or result is not None or isinstance(event, ErrorEvent):
            pipe.expire(self._log_key, self._ttl_s)
        if result is not None:
            pipe.set(names.job_result_key(self._job_id), result.model_dump_json(), ex=self._ttl_s)
        await pipe.execute()
        self._seq += 1
