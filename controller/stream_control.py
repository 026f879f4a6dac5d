"""The controller's writes into a job's stream: moving it on, ending it, cancelling it.

Every write is a compare-and-set against the job's lease (see ``broker.names.job_lease_key``)
and the log's length, inside one Lua script: the controller acts only on the attempt it has
seen, only when it has read every event so far, and in the same step it takes the lease away
from the worker it gave up on. A frozen worker that wakes later finds the lease moved and
writes nothing (``worker.stream``): a job never streams from two nodes.
"""

from __future__ import annotations

import enum
import time

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from broker import names
from broker.schemas import SCHEMA_VERSION, AnyStreamEvent

# Deletes the stale copies of a job still waiting in a node's queue lists. Kombu stores each
# message as JSON whose headers carry the task id (== the job id), so a plain substring
# search finds it. A node's queue is short; the scan is bounded anyway.
_REMOVE_QUEUED_LUA = """
local function remove_queued(job_id, first_key)
  local removed = 0
  for k = first_key, #KEYS do
    local items = redis.call('LRANGE', KEYS[k], 0, 9999)
    for _, item in ipairs(items) do
      if string.find(item, job_id, 1, true) then
        removed = removed + redis.call('LREM', KEYS[k], 1, item)
      end
    end
  end
  return removed
end
"""

# KEYS: lease, log, cancel, then the old node's queue lists.
# ARGV: attempt seen, new lease value, seq expected, event JSON, channel, TTL, job id,
# refuse if cancelled ('1'/'0').
# Returns 1 written, -1 lease moved on (another controller, or the job is over), -2 events
# not yet seen, -3 cancelled.
_TAKE_OVER_LUA = (
    _REMOVE_QUEUED_LUA
    + """
local lease = redis.call('GET', KEYS[1])
if lease == 'x' then return -1 end
local attempt = 1
if lease then attempt = tonumber(string.match(lease, '^(%d+)')) end
if attempt ~= tonumber(ARGV[1]) then return -1 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[3]) then return -2 end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -3 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[6])
remove_queued(ARGV[7], 4)
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""
)

# KEYS: cancel, lease, log, then the node's queue lists. ARGV: job id, TTL, channel,
# cancel channel, now.
# A job not yet started is finished here: its queued copies deleted, the lease closed, the
# cancellation written to its stream (so its client stops waiting at once). A running job's
# worker is told on the cancel channel and ends the stream itself.
# Returns 2 removed while queued, 1 running (worker told), 0 already over.
_CANCEL_LUA = (
    f"local SCHEMA_VERSION = {SCHEMA_VERSION}\n"
    + _REMOVE_QUEUED_LUA
    + """
redis.call('SET', KEYS[1], 1, 'EX', ARGV[2])
local lease = redis.call('GET', KEYS[2])
if lease == 'x' then return 0 end
if lease and string.find(lease, ':', 1, true) then
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  return 1
end
local attempt = 1
if lease then attempt = tonumber(lease) end
redis.call('SET', KEYS[2], 'x', 'EX', ARGV[2])
remove_queued(ARGV[1], 4)
local seq = redis.call('LLEN', KEYS[3])
local event = cjson.encode({v = SCHEMA_VERSION, type = 'error', job_id = ARGV[1], seq = seq,
  ts = tonumber(ARGV[5]), code = 'cancelled', message = 'job cancelled before it started',
  attempt = attempt, final = true})
redis.call('RPUSH', KEYS[3], event)
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[3], event)
return 2
"""
)

CLOSED_LEASE = "x"


class TakeOver(enum.Enum):
    WRITTEN = 1
    LEASE_MOVED = -1
    UNSEEN_EVENTS = -2
    CANCELLED = -3


class CancelOutcome(enum.Enum):
    REMOVED_FROM_QUEUE = 2
    RUNNING_TOLD = 1
    ALREADY_OVER = 0


def _take_over_call(
    event: AnyStreamEvent,
    *,
    attempt_seen: int,
    new_lease: str,
    old_node: str | None,
    refuse_if_cancelled: bool,
    ttl_s: int,
) -> tuple[list[str], list[str | int]]:
    job_id = event.job_id
    keys = [
        names.job_lease_key(job_id),
        names.job_log_key(job_id),
        names.job_cancel_key(job_id),
        *(names.node_queue_lists(old_node) if old_node else ()),
    ]
    args: list[str | int] = [
        attempt_seen,
        new_lease,
        event.seq,
        event.model_dump_json(),
        names.job_channel(job_id),
        ttl_s,
        job_id,
        "1" if refuse_if_cancelled else "0",
    ]
    return keys, args


def _cancel_call(job_id: str, node: str | None, ttl_s: int) -> tuple[list[str], list[str | int]]:
    keys = [
        names.job_cancel_key(job_id),
        names.job_lease_key(job_id),
        names.job_log_key(job_id),
        *(names.node_queue_lists(node) if node else ()),
    ]
    args: list[str | int] = [
        job_id,
        ttl_s,
        names.job_channel(job_id),
        names.CANCEL_CHANNEL,
        repr(time.time()),
    ]
    return keys, args


class StreamControl:
    """The scripts, registered once per client."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._take_over = redis.register_script(_TAKE_OVER_LUA)
        self._cancel = redis.register_script(_CANCEL_LUA)

    @staticmethod
    def preload_into(redis: Redis) -> None:
        redis.script_load(_TAKE_OVER_LUA)
        redis.script_load(_CANCEL_LUA)

    def take_over(
        self,
        event: AnyStreamEvent,
        *,
        attempt_seen: int,
        new_lease: str,
        old_node: str | None,
        refuse_if_cancelled: bool,
    ) -> TakeOver:
        """Append ``event`` (its seq must be the log's length) and set the lease, atomically."""
        keys, args = _take_over_call(
            event,
            attempt_seen=attempt_seen,
            new_lease=new_lease,
            old_node=old_node,
            refuse_if_cancelled=refuse_if_cancelled,
            ttl_s=self._ttl_s,
        )
        return TakeOver(int(self._take_over(keys=keys, args=args)))

    def cancel(self, job_id: str, node: str | None) -> CancelOutcome:
        keys, args = _cancel_call(job_id, node, self._ttl_s)
        return CancelOutcome(int(self._cancel(keys=keys, args=args)))


class AsyncStreamControl:
    """``StreamControl`` over an asyncio Redis: the same scripts and arguments."""

    def __init__(self, redis: AsyncRedis, ttl_s: int) -> None:
        self._ttl_s = ttl_s
        self._take_over = redis.register_script(_TAKE_OVER_LUA)
        self._cancel = redis.register_script(_CANCEL_LUA)

    @staticmethod
    async def preload_into(redis: AsyncRedis) -> None:
        await redis.script_load(_TAKE_OVER_LUA)
        await redis.script_load(_CANCEL_LUA)

    async def take_over(
        self,
        event: AnyStreamEvent,
        *,
        attempt_seen: int,
        new_lease: str,
        old_node: str | None,
        refuse_if_cancelled: bool,
    ) -> TakeOver:
        keys, args = _take_over_call(
            event,
            attempt_seen=attempt_seen,
            new_lease=new_lease,
            old_node=old_node,
            refuse_if_cancelled=refuse_if_cancelled,
            ttl_s=self._ttl_s,
        )
        return TakeOver(int(await self._take_over(keys=keys, args=args)))

    async def cancel(self, job_id: str, node: str | None) -> CancelOutcome:
        keys, args = _cancel_call(job_id, node, self._ttl_s)
        return CancelOutcome(int(await self._cancel(keys=keys, args=args)))
