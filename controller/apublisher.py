"""The asyncio client's publish: Celery's own task message, written on the event loop.

kombu's producer blocks, and a slow or unreachable broker makes it retry for a second or
more, so the asyncio client used to publish from send threads; the hop cost about 1 ms of
first token and a fifth of the client's CPU. Here Celery builds the message exactly as
``send_task`` would (``controller.task_envelope``) and one script call on the client's own
``redis.asyncio`` connection pushes it where kombu's Redis channel would, and writes the job's
node record (``job_node_key``) with it: one round trip, the two together or neither.

A stalled or unreachable broker never freezes the loop, loses a job silently or queues it
twice:

- each try is an await; the tries together are bounded by ``timeout_s``, then
  ``BrokerUnavailable`` says so, and connection errors are retried by Celery's own
  ``task_publish_retry_policy`` (3 retries, 0 to 1 s apart, by default);
- the script carries a deadline in Redis's clock (from the cluster view's ``TIME``) a little
  before ``timeout_s`` runs out, and past it pushes nothing: a call that sat in a stalled
  Redis's socket while the caller gave up does not queue a job when Redis wakes;
- a retry (the reply of the try before may have been lost after the push) first looks for the
  message in kombu's ``unacked`` hash and at the head of the queue, and pushes only if it is
  in neither. A copy that slips past both (taken and finished in between) is refused by the
  job's lease on the worker, as any redelivered copy is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.exceptions
from celery import Celery
from redis.asyncio import Redis as AsyncRedis

from broker.errors import BrokerUnavailable
from broker.settings import redacted_url
from controller.task_envelope import Envelope, EnvelopeBuilder

# KEYS: the queue's list, kombu's unacked hash, the job's node record.
# ARGV: the message, its delivery tag, the node, the record's TTL (s), the deadline (Redis
# time, s), '1' on a retry. Returns {1} pushed, {2} already there, {0, now} past the deadline.
PUSH_LUA = """
local now = redis.call('TIME')
local seconds = tonumber(now[1]) + tonumber(now[2]) / 1000000
if seconds > tonumber(ARGV[5]) then return {0, tostring(seconds)} end
if ARGV[6] == '1' then
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {2} end
  for _, queued in ipairs(redis.call('LRANGE', KEYS[1], 0, 99)) do
    if queued == ARGV[1] then return {2} end
  end
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return {1}
"""

PUBLISH_TIMEOUT_S = 5.0
DEADLINE_MARGIN_S = 1.0
"""The script's deadline comes this long before the caller's: a push that made it has time
to say so before the caller stops waiting."""

_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class AsyncPublisher:
    """Publishes a Celery app's task messages over an asyncio Redis (the app's broker)."""

    def __init__(
        self, app: Celery, redis: AsyncRedis, url: str, *, timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> None:
        self.builder = EnvelopeBuilder(app)
        self._redis = redis
        self._url = url
        self._script = redis.register_script(PUSH_LUA)
        self.timeout_s = timeout_s
        conf = app.conf
        policy = dict(conf.task_publish_retry_policy or {})
        self._retries = int(policy.get("max_retries") or 0) if conf.task_publish_retry else 0
        self._interval = (
            float(policy.get("interval_start", 0)),
            float(policy.get("interval_step", 0.2)),
            float(policy.get("interval_max", 1)),
        )

    @staticmethod
    async def preload_into(redis: AsyncRedis) -> None:
        await redis.script_load(PUSH_LUA)

    async def publish(
        self,
        envelope: Envelope,
        *,
        node_key: str,
        node: str,
        ttl_s: int,
        redis_now: Callable[[], float],
    ) -> None:
        """Push ``envelope`` and write ``node_key`` = ``node``; ``redis_now`` estimates
        Redis's clock (its ``TIME``, in seconds). Raises ``BrokerUnavailable`` when Redis
        cannot be reached or does not answer in time (nothing queued then), and Redis's own
        error when it refuses writes (full, read-only)."""
        started = time.monotonic()
        deadline = redis_now() + self.timeout_s - DEADLINE_MARGIN_S
        keys = [envelope.list_key, self.builder.unacked_key, node_key]
        retry = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    args = (envelope.payload, envelope.delivery_tag, node, ttl_s, deadline)
                    try:
                        reply = await self._script(keys=keys, args=[*args, int(retry > 0)])
                    except _CONNECTION_ERRORS as exc:
                        if retry >= self._retries:
                            raise self._unreachable(exc) from None
                        await asyncio.sleep(self._pause(retry))
                        retry += 1
                        continue
                    if reply[0] != 0:
                        return
                    # Past the deadline on arrival, yet answered: Redis's clock is not where
                    # the view put it (a clock step); one more try on Redis's own reading.
                    late_by = time.monotonic() - started
                    deadline = float(reply[1]) + self.timeout_s - late_by - DEADLINE_MARGIN_S
                    if late_by >= self.timeout_s - DEADLINE_MARGIN_S:
                        raise self._stalled()
        except TimeoutError:
            raise self._stalled() from None

    def _pause(self, retry: int) -> float:
        start, step, most = self._interval
        return min(start + step * retry, most)

    def _unreachable(self, exc: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"cannot reach Redis at {redacted_url(self._url)} to queue the job:"
            f" {type(exc).__name__}"
        )

    def _stalled(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"Redis at {redacted_url(self._url)} did not take the job's message within"
            f" {self.timeout_s:g} s (stalled or overloaded?); the job was not queued"
        )
