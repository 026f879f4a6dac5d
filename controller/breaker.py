"""Circuit breakers per node and per node/backend, shared by every controller through Redis.

A target (``pi2`` or ``pi2/ollama``) that fails ``threshold`` times in a row is *open*: the
router sends it nothing for ``cooldown_s``. After that it is *half-open*: exactly one
controller, whichever takes the probe permit first, may send it one job; that job's success
closes the breaker, its failure opens it for another cooldown. State lives in one Redis hash
and changes only inside Lua scripts, so two terminals and a gateway agree on it.

A provider that says when to come back (a 429's or 529's Retry-After, a spent quota's reset)
*holds* its backend's breaker open until then instead of for the default cooldown, with the
reason (``rate_limited``, ``overloaded``, ``quota_exhausted``) kept for ``corral nodes``.

Time comes from Redis's clock (TIME), not each controller's, so machines with skewed clocks
still agree on when a cooldown ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from broker import names

# A breaker's value in the hash: "<open 0|1>|<consecutive failures>|<opened at, epoch s>",
# and for a hold "|<open until, epoch s>|<reason>" after it.

# KEYS: breakers hash, probe key. ARGV: target, threshold. Returns 1 if now open. A hold that
# has not run out yet stays (a failure does not shorten a spent quota's wait).
_FAILURE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local open, failures, opened = 0, 0, 0
local held = nil
if raw then
  local a, b, c = string.match(raw, '^(%d)|(%d+)|([%d%.]+)')
  if a then open, failures, opened = tonumber(a), tonumber(b), tonumber(c) end
  local u, r = string.match(raw, '^%d|%d+|[%d%.]+|([%d%.]+)|(.*)$')
  if u then held = {tonumber(u), r} end
end
failures = failures + 1
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local value
if held and held[1] > now then
  value = '1|' .. failures .. '|' .. string.format('%.3f', opened) .. '|' ..
    string.format('%.3f', held[1]) .. '|' .. held[2]
  open = 1
else
  if open == 1 or failures >= tonumber(ARGV[2]) then
    open, opened = 1, now
  end
  value = open .. '|' .. failures .. '|' .. string.format('%.3f', opened)
end
redis.call('HSET', KEYS[1], ARGV[1], value)
redis.call('DEL', KEYS[2])
return open
"""

# KEYS: breakers hash, probe key. ARGV: target, seconds, reason. Opens the breaker until
# now + seconds (never earlier than a hold already there) and returns that moment.
_HOLD_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local failures, until_ = 0, 0
local reason = ARGV[3]
if raw then
  local b = string.match(raw, '^%d|(%d+)|')
  if b then failures = tonumber(b) end
  local u, r = string.match(raw, '^%d|%d+|[%d%.]+|([%d%.]+)|(.*)$')
  if u then until_, reason = tonumber(u), r end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wanted = now + tonumber(ARGV[2])
if wanted >= until_ then until_, reason = wanted, ARGV[3] end
local value = '1|' .. (failures + 1) .. '|' .. string.format('%.3f', now) .. '|' ..
  string.format('%.3f', until_) .. '|' .. reason
redis.call('HSET', KEYS[1], ARGV[1], value)
redis.call('DEL', KEYS[2])
return string.format('%.3f', until_)
"""

# KEYS: breakers hash, probe key. ARGV: target.
_SUCCESS_LUA = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


_SCRIPTS = (_FAILURE_LUA, _SUCCESS_LUA, _HOLD_LUA)

HOLD_REASONS = {
    "rate_limited": "rate limited",
    "overloaded": "overloaded",
    "quota_exhausted": "quota exhausted",
}
"""A hold's reason as a person reads it."""


class BreakerPhase(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerState:
    open: bool
    failures: int
    opened_at: float
    held_until: float | None = None
    """Open until this moment (Redis's clock) because the provider said so, not for the
    default cooldown."""
    reason: str | None = None
    """Why it is held: ``rate_limited``, ``overloaded`` or ``quota_exhausted``."""

    def reopens_at(self, cooldown_s: float) -> float:
        """When a probe may try the target again."""
        return self.held_until if self.held_until is not None else self.opened_at + cooldown_s

    def phase(self, now: float, cooldown_s: float) -> BreakerPhase:
        if not self.open:
            return BreakerPhase.CLOSED
        if now < self.reopens_at(cooldown_s):
            return BreakerPhase.OPEN
        return BreakerPhase.HALF_OPEN


def parse_breakers(entries: list[bytes]) -> dict[str, BreakerState]:
    """The hash's flat HGETALL answer as target -> state; unreadable entries are skipped."""
    states: dict[str, BreakerState] = {}
    for target, raw in zip(entries[::2], entries[1::2], strict=True):
        try:
            open_flag, failures, opened_at, *hold = raw.decode().split("|", 4)
            held_until, reason = (float(hold[0]), hold[1]) if len(hold) == 2 else (None, None)
            states[target.decode()] = BreakerState(
                open=open_flag == "1",
                failures=int(failures),
                opened_at=float(opened_at),
                held_until=held_until,
                reason=reason,
            )
        except (ValueError, UnicodeDecodeError):
            continue
    return states


def backend_target(node: str, backend: str) -> str:
    return f"{node}/{backend}"


class Breakers:
    """Records outcomes and hands out half-open probe permits."""

    def __init__(self, redis: Redis, *, threshold: int, cooldown_s: float) -> None:
        self._redis = redis
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failure = redis.register_script(_FAILURE_LUA)
        self._success = redis.register_script(_SUCCESS_LUA)
        self._hold = redis.register_script(_HOLD_LUA)

    @staticmethod
    def preload_into(redis: Redis) -> None:
        """Load the scripts up front (see ``controller.cluster.preload_scripts``)."""
        for script in _SCRIPTS:
            redis.script_load(script)

    def hold(self, target: str, seconds: float, reason: str) -> float:
        """Open the breaker for ``seconds`` (the provider's Retry-After); when it reopens."""
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        return float(self._hold(keys=keys, args=[target, seconds, reason]))

    def record_failure(self, target: str, *, open_now: bool = False) -> bool:
        """Count a failure; True when the breaker is (now) open. ``open_now``: open it
        whatever the count (a rate limit: the target will refuse the next jobs too)."""
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        threshold = 1 if open_now else self.threshold
        return bool(self._failure(keys=keys, args=[target, threshold]))

    def record_success(self, target: str) -> None:
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        self._success(keys=keys, args=[target])

    def try_probe(self, target: str) -> bool:
        """Take the one permit to try a half-open target; False if another controller has it.

        The permit expires after a cooldown, so a controller that dies mid-probe does not keep
        the target shut for ever.
        """
        ttl_ms = max(1, int(self.cooldown_s * 1000))
        return bool(self._redis.set(names.breaker_probe_key(target), 1, nx=True, px=ttl_ms))

    def reset(self, target: str) -> None:
        """Close a breaker by hand (``corral nodes --reset-breaker``)."""
        self.record_success(target)


class AsyncBreakers:
    """``Breakers`` over an asyncio Redis: the same scripts, keys and permits."""

    def __init__(self, redis: AsyncRedis, *, threshold: int, cooldown_s: float) -> None:
        self._redis = redis
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failure = redis.register_script(_FAILURE_LUA)
        self._success = redis.register_script(_SUCCESS_LUA)
        self._hold = redis.register_script(_HOLD_LUA)

    @staticmethod
    async def preload_into(redis: AsyncRedis) -> None:
        for script in _SCRIPTS:
            await redis.script_load(script)

    async def hold(self, target: str, seconds: float, reason: str) -> float:
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        return float(await self._hold(keys=keys, args=[target, seconds, reason]))

    async def record_failure(self, target: str, *, open_now: bool = False) -> bool:
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        threshold = 1 if open_now else self.threshold
        return bool(await self._failure(keys=keys, args=[target, threshold]))

    async def record_success(self, target: str) -> None:
        keys = [names.BREAKERS_HASH, names.breaker_probe_key(target)]
        await self._success(keys=keys, args=[target])

    async def try_probe(self, target: str) -> bool:
        ttl_ms = max(1, int(self.cooldown_s * 1000))
        return bool(await self._redis.set(names.breaker_probe_key(target), 1, nx=True, px=ttl_ms))
