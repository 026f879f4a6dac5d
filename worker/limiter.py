"""The configured rate limits, checked in Redis before a worker calls its provider.

Every worker shares one set of counters (broker.ratelimits): a call the limit has no room for
is not made; its attempt fails as ``rate_limited`` with the seconds to the minute's end, so the
controller moves the job on (before any token was asked for) or reports it. The tokens counted
at the start are the prompt's estimate; the job's real usage replaces it when it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.exceptions
from redis.asyncio import Redis

from broker import names
from broker.errors import BackendRateLimited
from broker.ratelimits import (
    ADMIT_LUA,
    COUNTERS_TTL_S,
    SETTLE_LUA,
    ProviderLimits,
    Scope,
    describe_refusal,
    estimate_prompt_tokens,
    limit_scopes,
    scope_args,
)
from broker.redis_clients import decoded
from broker.schemas import ChatMessage, JobResult

__all__ = ["Admission", "ProviderLimiter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admission:
    """A call counted in ``window``: what to correct when its real usage is known."""

    window: str
    fields: tuple[str, ...]
    estimated_tokens: int


class ProviderLimiter:
    """Counts calls against ``limits`` (settings' ``limits``) in Redis, shared cluster-wide."""

    def __init__(self, redis: Redis, limits: Mapping[str, ProviderLimits]) -> None:
        self._redis = redis
        self._limits = limits
        self._admit = redis.register_script(ADMIT_LUA)
        self._settle = redis.register_script(SETTLE_LUA)

    async def preload(self) -> None:
        """Load the scripts up front when limits are configured: no NOSCRIPT miss on the
        first job (which the demo's fakeredis broker answers by closing the connection)."""
        if self._limits:
            for script in (ADMIT_LUA, SETTLE_LUA):
                await self._redis.script_load(script)

    async def admit(
        self, kind: str, model: str, messages: Sequence[ChatMessage]
    ) -> Admission | None:
        """Count one call; None when no limit applies. Raises ``BackendRateLimited`` (with the
        seconds to the window's end) when a limit has no room for it.

        Redis failing here lets the call go: the limit is a courtesy to the provider, and the
        job's own writes will report a broker that is really gone.
        """
        scopes = limit_scopes(self._limits, kind, model)
        if not scopes:
            return None
        tokens = estimate_prompt_tokens(messages)
        args: list[str | int] = [tokens, COUNTERS_TTL_S, *scope_args(scopes)]
        try:
            reply = await self._admit(keys=[names.RATE_COUNTERS_HASH], args=args)
        except redis.exceptions.RedisError as exc:
            log.warning("rate limits not checked (Redis: %s); calling %s anyway", exc, kind)
            return None
        if int(reply[0]) == 1:
            return Admission(decoded(reply[1]), tuple(s.field for s in scopes), tokens)
        seconds_left = float(reply[1])
        scope = _scope_named(scopes, decoded(reply[2]))
        message = describe_refusal(scope, decoded(reply[3]), seconds_left)
        raise BackendRateLimited(
            f"not sent: {message}; retry after {seconds_left:.0f}s",
            retry_after=seconds_left,
            limit=scope.field,
        )

    async def settle(self, admission: Admission, result: JobResult | None) -> None:
        """Replace the estimate with the tokens the job really used (prompt and completion)."""
        if result is None:
            return
        used = (result.usage.prompt_tokens or admission.estimated_tokens) + (
            result.usage.completion_tokens
        )
        delta = used - admission.estimated_tokens
        if delta == 0:
            return
        try:
            await self._settle(
                keys=[names.RATE_COUNTERS_HASH], args=[admission.window, delta, *admission.fields]
            )
        except redis.exceptions.RedisError as exc:
            log.warning("rate-limit tokens not corrected (Redis: %s)", exc)


def _scope_named(scopes: Sequence[Scope], field: str) -> Scope:
    return next(s for s in scopes if s.field == field)
