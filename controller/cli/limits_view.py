"""Rate limits as ``corral nodes`` and ``corral route list`` show them.

Two sources: corral's own counters against the configured ``limits`` (this minute's requests and
tokens per provider), and what each provider's last answer said (its remaining requests and
tokens, and when they reset), recorded per node and backend by the workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from redis import Redis

from broker.ratelimits import WINDOW_S, ProviderLimits, RateCount, RateLimit, every_scope
from controller.cli.render import BreakerNote
from controller.cluster import ClusterView
from controller.provider_limits import ProviderHeaders, read_provider_headers
from controller.router import NodeState

__all__ = ["configured_limit_lines", "provider_headers_of", "provider_lines", "route_limit_notes"]


def provider_headers_of(redis: Redis, view: ClusterView) -> dict[str, ProviderHeaders]:
    """Every backend's recorded provider headers, by ``node/backend`` (one round trip)."""
    return read_provider_headers(
        redis, ((n.name, b.name) for n in view.nodes for b in n.info.backends)
    )


def provider_lines(headers: Mapping[str, ProviderHeaders]) -> list[str]:
    """One line per backend whose provider sent rate-limit headers."""
    lines = []
    for target, seen in sorted(headers.items()):
        summary = seen.summary()
        if summary:
            lines.append(f"{target}: provider says {summary}")
    return lines


def route_limit_notes(
    serving: Iterable[tuple[NodeState, str]],
    notes: Mapping[str, BreakerNote],
    headers: Mapping[str, ProviderHeaders],
) -> list[str]:
    """For ``route list``: each up serving backend's open breaker (rate limited, quota
    exhausted: how long) and its provider's last word on the remaining requests and tokens."""
    found = []
    for state, backend in serving:
        if not state.up:
            continue
        target = f"{state.name}/{backend}"
        note = notes.get(target)
        if note is not None:
            found.append(f"{target}: {note.short}")
        seen = headers.get(target)
        summary = seen.summary() if seen is not None else ""
        if summary:
            found.append(f"{target}: provider says {summary}")
    return found


def _usage(limit: RateLimit, counter: RateCount | None) -> str:
    requests = counter.requests if counter else 0
    tokens = counter.tokens if counter else 0
    parts = []
    if limit.rpm:
        parts.append(f"{requests}/{limit.rpm} requests")
    if limit.tpm:
        parts.append(f"{tokens}/{limit.tpm} tokens")
    return ", ".join(parts)


def configured_limit_lines(limits: Mapping[str, ProviderLimits], view: ClusterView) -> list[str]:
    """This minute's use of each configured limit: ``limit anthropic: 2/2 requests, ...``."""
    window = math.floor(view.redis_time / WINDOW_S)
    left = (window + 1) * WINDOW_S - view.redis_time
    lines = []
    for scope in every_scope(limits):
        counter = view.rate_counters.get(scope.field)
        if counter is not None and counter.window != window:
            counter = None
        lines.append(
            f"limit {scope.label}: {_usage(scope.limit, counter)} this minute"
            f" (resets in {left:.0f}s)"
        )
    return lines
