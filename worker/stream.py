"""Publishing a job's StreamEvents: live on pub/sub, kept in a replay log, in one round trip.

Each event is appended to a Redis list (index == sequence number) and published on the job's
channel by one Lua script, so a subscriber that misses a message can refill the gap from the
list by range, and a late one can read it all. The append always precedes the publish, so
anything a subscriber could have missed is already in the log.

Events that are ready together go out together: one script call appends several in order and
publishes each as its own message (subscribers still read one event per message). A job's
tokens are queued without waiting (``delta(..., wait=False)``), and one writer per stream sends
whatever is queued when its turn comes: an instant backend's token and ``done`` in one call, a
fast stream's tokens in one call while the previous call is in flight. A token that is alone
goes out at the loop's next turn, as it did when each append was its own task.

Only the holder of the job's lease may write (see ``broker.names.job_lease_key`` for its
states): every append checks it in the same script, so a worker that was given up on (frozen,
cut off, its job moved to another node) can never add tokens to a stream that has moved on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions
from redis.asyncio import Redis

from broker import names
from broker.schemas import (
    SCHEMA_VERSION,
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    ProgressEvent,
    ToolCall,
)

# KEYS: log, result, lease. ARGV: channel, log TTL (0 = leave), result JSON ('' = none), lease
# token ('' = no lease: model operations), the first event's seq, then each event's JSON in order.
# Idempotent: the very same events already at their places in the log (a retry after a reply
# lost to a dropped connection) are not written twice, which keeps index == seq. Anything else
# at those places means someone else has written since: this writer is out (0), like a lost
# lease. The script runs whole or not at all, so a batch is never half written.
_APPEND_LUA = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then return 0 end
local first = tonumber(ARGV[5])
if redis.call('LLEN', KEYS[1]) > first then
  for i = 6, #ARGV do
    if redis.call('LINDEX', KEYS[1], first + i - 6) ~= ARGV[i] then return 0 end
  end
  return 2
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 6))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2]) end
for i = 6, #ARGV do redis.call('PUBLISH', ARGV[1], ARGV[i]) end
return 1
"""

# KEYS: cancel, lease, log. ARGV: attempt, token, lease TTL, channel, log TTL, job id, ts,
# node, backend, model, instance, tier, reason (empty: left out of the event).
# The lease is absent (attempt 1 may start), "<n>" (attempt n may start), "<n>:<claimer>"
# (attempt n is running) or "x" (the job is over). A delivery may start only the attempt the
# lease authorises; it then writes the started event at the log's end, built here so its
# sequence number is the log's length at that moment. One round trip between the worker
# receiving a job and calling its backend. Returns {status, seq}.
_CLAIM_LUA = (
    f"local SCHEMA_VERSION = {SCHEMA_VERSION}\n"
    + """
local lease = redis.call('GET', KEYS[2])
-- This very claim already went through (its reply was lost to a dropped connection, and it is
-- sent again): its started event is the log's last, nothing else may have written since.
if lease == ARGV[2] then return {2, redis.call('LLEN', KEYS[3]) - 1} end
local allowed = (lease == false and ARGV[1] == '1') or lease == ARGV[1]
if not allowed then return {0, 0} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], 'x', 'EX', ARGV[3])
  return {1, redis.call('LLEN', KEYS[3])}
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
local seq = redis.call('LLEN', KEYS[3])
local started = cjson.encode({v = SCHEMA_VERSION, type = 'started', job_id = ARGV[6], seq = seq,
  ts = tonumber(ARGV[7]), node = ARGV[8], backend = ARGV[9], model = ARGV[10],
  attempt = tonumber(ARGV[1]), instance = ARGV[11],
  tier = (ARGV[12] ~= '' and ARGV[12] or nil), reason = (ARGV[13] ~= '' and ARGV[13] or nil)})
redis.call('RPUSH', KEYS[3], started)
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', ARGV[4], started)
return {2, seq}
"""
)


log = logging.getLogger(__name__)

_RETRY_PAUSE_S = 0.25
_MAX_BATCH = 256
"""The most events one script call writes (Lua's unpack takes a few thousand at most), and
how many may wait queued before ``delta(..., wait=False)`` waits for the writer: a backend
faster than Redis is slowed to Redis's pace instead of filling the worker's memory."""
T = TypeVar("T")


class Claim(enum.Enum):
    TAKEN_ELSEWHERE = 0
    """This delivery is not the attempt the lease authorises (a redelivered copy, or a job
    moved to another node, or already over): do nothing."""
    CANCELLED = 1
    """The job was cancelled before it started."""
    STARTED = 2
    """The lease is ours and the started event is out: run it."""


class Fenced(Exception):
    """The lease moved on while this worker was streaming: stop, write nothing more."""


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


@dataclass(frozen=True)
class ClaimOutcome:
    claim: Claim
    first_seq: int


@dataclass(frozen=True, slots=True)
class _Queued:
    """An event waiting for the writer, serialized once."""

    event_json: str
    result_json: str
    """The job's result, stored beside the event ('' = none)."""
    expire: bool
    """Whether the write (re)sets the log's expiry: on the first and the last events only."""


class JobStream:
    """The single writer of one job's event stream; the lease token keeps it single.

    Events take their sequence numbers when they are queued, in order; one writer task per
    stream sends what is queued, several events per script call when several are waiting.
    A failed write (the lease moved on, Redis gone past the outage tolerance) stops the
    writer, and the next event queued or awaited raises it.
    """

    def __init__(
        self,
        scripts: StreamScripts,
        job_id: str,
        ttl_s: int,
        *,
        first_seq: int = 0,
        lease_token: str = "",
        outage_tolerance_s: float = 60.0,
    ) -> None:
        self._job_id = job_id
        self._ttl_s = ttl_s
        self._seq = first_seq
        """The next event's sequence number (queued events have theirs already)."""
        self._token = lease_token
        self._log_key = names.job_log_key(job_id)
        self._channel = names.job_channel(job_id)
        self._append_keys = [
            self._log_key,
            names.job_result_key(job_id),
            names.job_lease_key(job_id),
        ]
        self._append = scripts.append
        self._claim = scripts.claim
        self._first = True
        self._outage_tolerance_s = outage_tolerance_s
        self._queued: list[_Queued] = []
        self._writer: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self._waiting_out_outage = False

    @property
    def job_id(self) -> str:
        return self._job_id

    async def claim(
        self,
        *,
        attempt: int,
        claimer: str,
        node: str,
        backend: str,
        model: str,
        lease_ttl_s: int,
        tier: str | None = None,
        reason: str | None = None,
    ) -> Claim:
        """Take the lease for ``attempt`` and publish the started event (see _CLAIM_LUA).

        Redis restarting (or a dropped pooled connection) is waited out as for appends. The
        token carries a nonce of this claim: sent again after a lost reply, the claim finds its
        own token and is STARTED; another delivery of the same attempt (even in this process)
        has another nonce and is TAKEN_ELSEWHERE, so a job never streams twice."""
        token = f"{attempt}:{claimer}:{secrets.token_hex(4)}"
        keys = [
            names.job_cancel_key(self._job_id),
            names.job_lease_key(self._job_id),
            self._log_key,
        ]
        args: list[str | int | float] = [
            str(attempt),
            token,
            lease_ttl_s,
            self._channel,
            self._ttl_s,
            self._job_id,
            repr(time.time()),
            node,
            backend,
            model,
            claimer,
            tier or "",
            reason or "",
        ]
        status, seq = await self._through_outage(lambda: self._claim(keys=keys, args=args))
        claim = Claim(int(status))
        if claim is Claim.STARTED:
            self._token = token
            self._seq = int(seq) + 1
            self._first = False
        elif claim is Claim.CANCELLED:
            self._seq = int(seq)  # the cancellation is written after what is there
        return claim

    async def delta(
        self,
        text: str,
        *,
        reasoning: str = "",
        tool_calls: tuple[ToolCall, ...] = (),
        wait: bool = True,
    ) -> None:
        """A token. ``wait=False`` queues it and returns at once (unless ``_MAX_BATCH`` are
        already waiting): it goes out with whatever else is queued by the writer's turn, and
        a failed write is raised by a later call."""
        self._queue(
            DeltaEvent(
                job_id=self._job_id,
                seq=self._seq,
                ts=time.time(),
                text=text,
                reasoning=reasoning,
                tool_calls=tool_calls,
            )
        )
        if wait or len(self._queued) >= _MAX_BATCH:
            await self._written()

    async def progress(self, status: str, completed: int | None, total: int | None) -> None:
        await self._send(
            ProgressEvent(
                job_id=self._job_id,
                seq=self._seq,
                ts=time.time(),
                status=status,
                completed=completed,
                total=total,
            )
        )

    async def done(self, result: JobResult) -> None:
        await self._send(
            DoneEvent(job_id=self._job_id, seq=self._seq, ts=time.time(), result=result),
            result=result,
        )

    async def error(
        self,
        code: str,
        message: str,
        node: str | None,
        result: JobResult | None,
        *,
        attempt: int = 1,
        final: bool = True,
        retry_after: float | None = None,
        limit: str | None = None,
    ) -> None:
        event = ErrorEvent(
            job_id=self._job_id,
            seq=self._seq,
            ts=time.time(),
            code=code,
            message=message,
            node=node,
            attempt=attempt,
            final=final,
            retry_after=retry_after,
            limit=limit,
        )
        await self._send(event, result=result, set_expiry=True)

    async def interrupted(
        self,
        code: str,
        message: str,
        node: str,
        partial_text: str,
        result: JobResult,
        *,
        attempt: int,
        final: bool,
    ) -> None:
        event = InterruptedEvent(
            job_id=self._job_id,
            seq=self._seq,
            ts=time.time(),
            code=code,
            message=message,
            node=node,
            attempt=attempt,
            partial_text=partial_text,
            final=final,
        )
        await self._send(event, result=result if final else None, set_expiry=True)

    async def settle(self) -> None:
        """Wait until the queued events are written or the writer has failed, raising nothing:
        for a caller that is about to append after the end of the log with another stream."""
        if self._writer is not None:
            await asyncio.wait((self._writer,))

    async def _send(
        self, event: AnyStreamEvent, result: JobResult | None = None, set_expiry: bool = False
    ) -> None:
        """Queue ``event`` and return once it (and everything queued before it) is written."""
        self._queue(event, result, set_expiry)
        await self._written()

    def _queue(
        self, event: AnyStreamEvent, result: JobResult | None = None, set_expiry: bool = False
    ) -> None:
        if self._failure is not None:
            raise self._failure
        # The expiry is set on the first and the last event only: less work per token.
        expire = set_expiry or result is not None or self._first
        self._queued.append(
            _Queued(
                event.model_dump_json(),
                result.model_dump_json() if result is not None else "",
                expire,
            )
        )
        self._first = False
        self._seq += 1
        if self._writer is None:
            # A task, not a call: it starts at the loop's next turn, by when the job may have
            # queued more (an instant backend's done is ready without the loop turning).
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())

    async def _written(self) -> None:
        """Wait until everything queued is written; raise what stopped the writer.

        The writer is shielded from a cancel of the job: a write Redis may already have run
        must complete, and its outcome be known, or the job's next event (the cancellation)
        would be refused for taking a place that is not free, and the stream would have no
        end (seen in ``corral chat`` when Ctrl-C closely followed a token). So a cancel waits
        for the write in flight, unless Redis is down, then goes on.
        """
        writer = self._writer
        if writer is not None:
            try:
                await asyncio.shield(writer)
            except asyncio.CancelledError:
                if not writer.done() and not self._waiting_out_outage:
                    await asyncio.wait((writer,))
                raise
        if self._failure is not None:
            raise self._failure

    async def _write_queued(self) -> None:
        """The stream's writer: sends the queue in order, as many events per call as wait."""
        try:
            while self._queued:
                batch = self._queued[:_MAX_BATCH]
                await self._write(batch, first_seq=self._seq - len(self._queued))
                del self._queued[: len(batch)]
        except Exception as exc:  # noqa: BLE001 -- kept for the job: its next event raises it
            self._failure = exc
        finally:
            self._writer = None

    async def _write(self, batch: list[_Queued], first_seq: int) -> None:
        args: list[str | int] = [
            self._channel,
            self._ttl_s if any(queued.expire for queued in batch) else 0,
            next((queued.result_json for queued in reversed(batch) if queued.result_json), ""),
            self._token,
            first_seq,
            *(queued.event_json for queued in batch),
        ]
        written = await self._through_outage(
            lambda: self._append(keys=self._append_keys, args=args)
        )
        if not int(written):
            raise Fenced(f"job {self._job_id} has moved on; this worker no longer owns it")

    async def _through_outage(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, sent again while Redis is unreachable, up to the outage tolerance.

        Redis restarting (or a pooled connection it dropped) pauses the job instead of losing
        it: its events wait in the queue, and past ``_MAX_BATCH`` of them the backend's stream
        waits too. Only for idempotent scripts (the claim and the append both are), since a
        reply lost after Redis ran the script means it runs twice."""
        deadline = time.monotonic() + self._outage_tolerance_s
        while True:
            try:
                answer = await call()
                self._waiting_out_outage = False
                return answer
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise
                self._waiting_out_outage = True
                log.warning("job %s: Redis unreachable (%s); retrying", self._job_id, exc)
                await asyncio.sleep(_RETRY_PAUSE_S)
