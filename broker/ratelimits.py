"""Configured request and token limits per provider, counted in Redis by every process.

``limits:`` in corral.yaml caps what the whole cluster sends a provider (and, optionally, one
of its models) per minute: ``rpm`` requests and ``tpm`` tokens. Every worker counts its calls
in one Redis hash before it makes them (``ADMIT_LUA``), so two workers share one limit; every
controller reads the same hash with the cluster view and routes nothing to a provider that is
over its limit. The window is Redis's clock's current minute (a fixed window: the counts start
again at its end), so skewed machine clocks still agree.

Each counter is one field of ``names.RATE_COUNTERS_HASH``: ``<kind>`` for the provider,
``<kind>|<model>`` for a model, holding ``<window>|<requests>|<tokens>``. The hash expires two
minutes after its last write; a field of a past window counts as zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from broker.schemas import ChatMessage

__all__ = [
    "ADMIT_LUA",
    "COUNTERS_TTL_S",
    "HEADERS_UPDATED_AT_FIELD",
    "SETTLE_LUA",
    "WINDOW_S",
    "ProviderLimits",
    "RateCount",
    "RateLimit",
    "Scope",
    "describe_refusal",
    "estimate_prompt_tokens",
    "every_scope",
    "limit_scopes",
    "over_limit",
    "parse_counters",
    "scope_args",
]

WINDOW_S = 60
COUNTERS_TTL_S = 2 * WINDOW_S

HEADERS_UPDATED_AT_FIELD = "updated_at"
"""In a backend's ``names.provider_limits_key`` hash, beside the provider's own headers: when
the answer that carried them came (epoch seconds)."""


class RateLimit(BaseModel):
    """At most ``rpm`` requests and ``tpm`` tokens (prompt and completion) a minute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class ProviderLimits(RateLimit):
    """A provider's limits, and tighter ones for some of its models (both apply)."""

    models: dict[str, RateLimit] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scope:
    """One counter a call is checked against: the provider's, or one model's."""

    field: str
    """The counter's field in the hash (``anthropic`` or ``anthropic|claude-opus-4``)."""
    label: str
    """What a message calls it (``anthropic`` or ``anthropic model claude-opus-4``)."""
    limit: RateLimit


def _provider_scope(kind: str, limit: RateLimit) -> Scope | None:
    return Scope(kind, kind, limit) if limit.rpm or limit.tpm else None


def _model_scope(kind: str, model: str, limit: RateLimit | None) -> Scope | None:
    if limit is None or not (limit.rpm or limit.tpm):
        return None
    return Scope(f"{kind}|{model}", f"{kind} model {model}", limit)


def limit_scopes(limits: Mapping[str, ProviderLimits], kind: str, model: str) -> list[Scope]:
    """The counters a call of ``model`` on a ``kind`` backend counts against (none: no limit)."""
    provider = limits.get(kind)
    if provider is None:
        return []
    model_limit = provider.models.get(model)
    scopes = (_provider_scope(kind, provider), _model_scope(kind, model, model_limit))
    return [s for s in scopes if s is not None]


def every_scope(limits: Mapping[str, ProviderLimits]) -> list[Scope]:
    """Every configured limit, providers sorted, each followed by its models'."""
    scopes: list[Scope | None] = []
    for kind, provider in sorted(limits.items()):
        scopes.append(_provider_scope(kind, provider))
        scopes += [_model_scope(kind, m, lim) for m, lim in sorted(provider.models.items())]
    return [s for s in scopes if s is not None]


def scope_args(scopes: Sequence[Scope]) -> list[str | int]:
    """``ADMIT_LUA``'s per-scope arguments: field, rpm, tpm (0: no limit)."""
    return [part for s in scopes for part in (s.field, s.limit.rpm or 0, s.limit.tpm or 0)]


def estimate_prompt_tokens(messages: Iterable[ChatMessage]) -> int:
    """A prompt's tokens before the provider counts them: about four characters a token, plus
    a few for each message's framing. Corrected with the real usage when the job ends."""
    return sum(math.ceil(len(m.content) / 4) + 4 for m in messages)


# KEYS: the counters hash. ARGV: the call's estimated tokens, the TTL, then (field, rpm, tpm)
# per scope. Admits the call in every scope or in none. Returns {1, window} when admitted;
# {0, seconds to the window's end, the scope's field, 'rpm' or 'tpm'} when refused. A prompt
# bigger than the whole tpm passes in an empty window, or it could never run at all. The 60s
# below are WINDOW_S.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = math.floor(now / 60)
local tokens = tonumber(ARGV[1])
local rows = {}
for i = 3, #ARGV, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local requests, used = 0, 0
  if raw then
    local w, r, k = string.match(raw, '^(%d+)|(%d+)|(%d+)$')
    if w and tonumber(w) == window then requests, used = tonumber(r), tonumber(k) end
  end
  local rpm, tpm = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local left = string.format('%.3f', (window + 1) * 60 - now)
  if rpm > 0 and requests + 1 > rpm then return {0, left, ARGV[i], 'rpm'} end
  if tpm > 0 and used > 0 and used + tokens > tpm then return {0, left, ARGV[i], 'tpm'} end
  table.insert(rows, {ARGV[i], requests + 1, used + tokens})
end
for _, row in ipairs(rows) do
  redis.call('HSET', KEYS[1], row[1], string.format('%d|%d|%d', window, row[2], row[3]))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return {1, tostring(window)}
"""

# KEYS: the counters hash. ARGV: the window the call was admitted in, the tokens to add
# (negative: the estimate was too high), then the fields. A window already over is left alone.
SETTLE_LUA = """
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local w, r, k = string.match(raw, '^(%d+)|(%d+)|(%d+)$')
    if w == ARGV[1] then
      local used = math.max(0, tonumber(k) + tonumber(ARGV[2]))
      redis.call('HSET', KEYS[1], ARGV[i], string.format('%s|%s|%d', w, r, used))
    end
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class RateCount:
    """One scope's counts in one window."""

    window: int
    requests: int
    tokens: int


def parse_counters(entries: Mapping[bytes, bytes] | list[bytes]) -> dict[str, RateCount]:
    """The hash's HGETALL (a mapping, or Lua's flat list) as field -> counts; unreadable
    fields are skipped."""
    pairs = (
        list(entries.items())
        if isinstance(entries, Mapping)
        else list(zip(entries[::2], entries[1::2], strict=True))
    )
    counters: dict[str, RateCount] = {}
    for field, raw in pairs:
        try:
            window, requests, tokens = (int(p) for p in raw.decode().split("|"))
            counters[field.decode()] = RateCount(window, requests, tokens)
        except (ValueError, UnicodeDecodeError):
            continue
    return counters


def over_limit(
    scopes: Sequence[Scope], counters: Mapping[str, RateCount], now: float
) -> tuple[Scope, str, float] | None:
    """The first scope already at its limit in the window of ``now`` (Redis's clock), with
    ``rpm``/``tpm`` and the seconds to the window's end; None if a call may go."""
    window = math.floor(now / WINDOW_S)
    for scope in scopes:
        counter = counters.get(scope.field)
        if counter is None or counter.window != window:
            continue
        left = (window + 1) * WINDOW_S - now
        if scope.limit.rpm and counter.requests >= scope.limit.rpm:
            return scope, "rpm", left
        if scope.limit.tpm and counter.tokens >= scope.limit.tpm:
            return scope, "tpm", left
    return None


def describe_refusal(scope: Scope, which: str, seconds_left: float) -> str:
    """Why a call is not made: ``anthropic is at its configured rpm of 2 for 41s more``."""
    value = scope.limit.rpm if which == "rpm" else scope.limit.tpm
    return (
        f"{scope.label} is at its configured {which} of {value} (limits: in corral.yaml)"
        f" for {seconds_left:.0f}s more"
    )
