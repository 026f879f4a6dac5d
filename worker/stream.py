"""Publishing a job's StreamEvents: live on pub/sub, kept in a replay log, in one round trip.

Each event is appended to a Redis list (index == sequence number) and published on the job's
channel by one Lua script, so a subscriber that misses a message can refill the gap from the
list by range, and a late one can read it all. The append always precedes the publish, so
anything a subscriber could have missed is already in the log.
"""

from __future__ import annotations

import enum
import time

from redis.asyncio import Redis

from broker import names
from broker.schemas import DeltaEvent, DoneEvent, ErrorEvent, JobResult, StartedEvent

AnyEvent = StartedEvent | DeltaEvent | DoneEvent | ErrorEvent

# KEYS: log, result. ARGV: event JSON, channel, log TTL (0 = leave), result JSON ('' = none).
_APPEND_LUA = """
redis.call('RPUSH', KEYS[1], ARGV[1])
if ARGV[3] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[3]) end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# KEYS: cancel, lease, log. ARGV: node, lease TTL, started JSON, channel, log TTL.
# Takes the job's lease and, unless cancelled, publishes the started event: one round trip
# between the worker receiving a job and calling its backend.
_CLAIM_LUA = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) == false then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 2
"""


class Claim(enum.Enum):
    TAKEN_ELSEWHERE = 0
    """Another delivery of this job holds the lease: do nothing."""
    CANCELLED = 1
    """The lease is ours but the job was cancelled before it started."""
    STARTED = 2
    """The lease is ours and the started event is out: run it."""


class StreamScripts:
    """The Lua scripts, registered once per Redis client and shared by every job."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.append = redis.register_script(_APPEND_LUA)
        self.claim = redis.register_script(_CLAIM_LUA)

    async def preload(self) -> None:
        """Load the scripts now, so the first job needs no EVALSHA-miss-then-EVAL round trip.

        It also keeps corral usable on fakeredis's TCP server (the demo's fallback broker),
        which closes a connection after any error reply, NOSCRIPT included.
        """
        await self._redis.script_load(_APPEND_LUA)
        await self._redis.script_load(_CLAIM_LUA)


class JobStream:
    """The single writer of one job's event stream (the lease guarantees it is single)."""

    def __init__(
        self, scripts: StreamScripts, job_id: str, ttl_s: int, *, first_seq: int = 0
    ) -> None:
        self._job_id = job_id
        self._ttl_s = ttl_s
        self._seq = first_seq
        self._log_key = names.job_log_key(job_id)
        self._channel = names.job_channel(job_id)
        self._append = scripts.append
        self._claim = scripts.claim

    @property
    def events_sent(self) -> int:
        return self._seq

    async def claim(self, node: str, backend: str, model: str, lease_ttl_s: int) -> Claim:
        started = StartedEvent(
            job_id=self._job_id,
            seq=self._seq,
            ts=time.time(),
            node=node,
            backend=backend,
            model=model,
        )
        keys = [
            names.job_cancel_key(self._job_id),
            names.job_lease_key(self._job_id),
            self._log_key,
        ]
        args: list[str | int] = [
            node,
            lease_ttl_s,
            started.model_dump_json(),
            self._channel,
            self._ttl_s,
        ]
        claim = Claim(int(await self._claim(keys=keys, args=args)))
        if claim is Claim.STARTED:
            self._seq += 1
        return claim

    async def delta(self, text: str) -> None:
        await self._send(DeltaEvent(job_id=self._job_id, seq=self._seq, ts=time.time(), text=text))

    async def done(self, result: JobResult) -> None:
        await self._send(
            DoneEvent(job_id=self._job_id, seq=self._seq, ts=time.time(), result=result),
            result=result,
        )

    async def error(
        self, code: str, message: str, node: str | None, result: JobResult | None
    ) -> None:
        event = ErrorEvent(
            job_id=self._job_id,
            seq=self._seq,
            ts=time.time(),
            code=code,
            message=message,
            node=node,
        )
        await self._send(event, result=result, set_expiry=True)

    async def _send(
        self, event: AnyEvent, result: JobResult | None = None, set_expiry: bool = False
    ) -> None:
        # The expiry is set on the first and the last event only: less work per token.
        expire = set_expiry or result is not None or event.seq == 0
        await self._append(
            keys=[self._log_key, names.job_result_key(self._job_id)],
            args=[
                event.model_dump_json(),
                self._channel,
                self._ttl_s if expire else 0,
                result.model_dump_json() if result is not None else "",
            ],
        )
        self._seq += 1
