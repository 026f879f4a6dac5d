"""What both clients decide before and around sending a job, without I/O.

The blocking ``CorralClient`` and the asyncio ``AsyncCorralClient`` read the cluster and call
Redis and Celery their own way; which candidate to take, which breakers are in the way, what
the Celery message says and which breaker a failure counts against are decided here, once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain, islice, takewhile
from typing import Any

import kombu.exceptions
import redis.exceptions

from broker import names
from broker.errors import NODE_FAILURE_CODES, BrokerUnavailable, NoNodeAvailable
from broker.provider_models import provider_url
from broker.ratelimits import ProviderLimits, describe_refusal, limit_scopes, over_limit
from broker.schemas import JobAssignment, JobSpec
from broker.settings import redacted_url
from controller.breaker import HOLD_REASONS, BreakerPhase, BreakerState, backend_target
from controller.cluster import ClusterView
from controller.ranking import Ranking
from controller.router import Candidate, candidates_for
from controller.tiers import explain_choice


def with_sent(view: ClusterView, sent: Counter[str]) -> ClusterView:
    """``view`` with the jobs a client sent since reading it counted as queued, so a burst
    routed from one cached view still spreads out."""
    if not sent:
        return view
    return replace(view, nodes=view.nodes.with_queued(sent))


def breaker_phases(view: ClusterView, cooldown_s: float) -> dict[str, BreakerPhase]:
    """Every breaker that is not closed, by target."""
    phases = {
        target: state.phase(view.redis_time, cooldown_s) for target, state in view.breakers.items()
    }
    return {t: p for t, p in phases.items() if p is not BreakerPhase.CLOSED}


def preferred_candidates(
    spec: JobSpec,
    view: ClusterView,
    phases: Mapping[str, BreakerPhase],
    *,
    aliases: Mapping[str, Sequence[str]],
    avoid: set[str] | None = None,
    never: set[str] | None = None,
    sticky_node: str | None = None,
    limits: Mapping[str, ProviderLimits] | None = None,
) -> Sequence[Candidate]:
    """Candidates in the order to try them; RoutingError when there is none. Made as they
    are read (``controller.ranking.Ranking``): a caller stops at the first it can use.

    Open breakers keep their targets out, as do backends whose provider is at its configured
    rate limit (``limits``) and ``node/backend`` targets in ``never``; those in ``avoid``
    come only when nothing else is left.
    """
    blocked: dict[str, str] = {t: "already failed this job" for t in never or ()}
    blocked |= {
        t: breaker_reason(view.breakers.get(t), view.redis_time)
        for t, p in phases.items()
        if p is BreakerPhase.OPEN
    }
    if limits:
        blocked |= over_limit_targets(spec, view, limits)
    try:
        ranked = candidates_for(spec, view.nodes, blocked, aliases=aliases, sticky_node=sticky_node)
    except NoNodeAvailable as exc:
        exc.retry_after = soonest_reopening(blocked, spec, view, limits or {})
        raise
    ranked = most_quota_first(ranked, view)
    if not avoid:
        return ranked  # the common case: no copy of the ranking
    preferred = Ranking(c for c in ranked if c.backend_target not in avoid)
    return preferred if preferred else ranked


def most_quota_first(ranked: Sequence[Candidate], view: ClusterView) -> Sequence[Candidate]:
    """``ranked`` with its leading routes of a paid tier (a subscription, a metered API)
    ordered by the share of their provider's quota left, most first; a route whose heartbeat
    says nothing counts as having all of it. Only the leading group: a job takes the first
    candidate, and a failed attempt asks for candidates again.

    Local routes stay as ranked (spare capacity is their headroom), so a fleet that answers
    from its own machines never pays for this. Reads ``ranked`` only as far as the leading
    group (the router makes candidates as they are read)."""
    if not ranked or ranked[0].tier == "local":
        return ranked
    first = ranked[0]
    leading = list(takewhile(lambda c: _same_group(c, first), ranked))
    size = len(leading)
    if size < 2:
        return ranked
    left = [_quota_left(view, c) for c in leading]
    if all(share == 1.0 for share in left):
        return ranked
    # sorted() is stable: equal shares keep the router's order (spare capacity, latency...).
    group = [c for _, c in sorted(zip(left, leading, strict=True), key=lambda p: -p[0])]
    return Ranking(chain(group, islice(ranked, size, None)))


def _same_group(c: Candidate, first: Candidate) -> bool:
    return (c.sticky, c.choice, c.tier) == (first.sticky, first.choice, first.tier)


def _quota_left(view: ClusterView, candidate: Candidate) -> float:
    state = view.nodes.state(candidate.node)
    if state is not None:
        for backend in state.info.backends:
            if backend.name == candidate.backend and backend.quota_left is not None:
                return backend.quota_left
    return 1.0


def with_inferred_provider(
    spec: JobSpec, aliases: Mapping[str, Sequence[str]], provider_urls: Mapping[str, str]
) -> JobSpec | None:
    """``spec`` sent to the cloud provider its bare model name belongs to (``claude-*`` ->
    ``anthropic://``), for a model no node holds; None when that does not apply (a pinned
    node, a route, an alias, or a name no provider uses). Only after the fleet's own models:
    the caller asks this once the router found no node with the model."""
    if spec.kind != "chat" or spec.model is None or spec.node or spec.route_url:
        return None
    if spec.model in aliases:
        return None
    url = provider_url(spec.model, provider_urls)
    return None if url is None else spec.model_copy(update={"route_url": url})


def with_reason(
    spec: JobSpec,
    candidate: Candidate,
    view: ClusterView,
    phases: Mapping[str, BreakerPhase],
    *,
    aliases: Mapping[str, Sequence[str]],
    never: set[str] | None = None,
) -> Candidate:
    """``candidate`` with the reason it was chosen (the cheaper routes skipped, and why)."""
    blocked = {t for t, p in phases.items() if p is BreakerPhase.OPEN}
    reason = explain_choice(
        spec, candidate, view.nodes, blocked, aliases=aliases, failed=never or ()
    )
    return candidate._replace(reason=reason)


def breaker_reason(state: BreakerState | None, now: float) -> str:
    """Why an open breaker keeps its target out, for a routing error."""
    if state is None or state.reason is None or state.held_until is None:
        return "circuit breaker open"
    said = HOLD_REASONS.get(state.reason, state.reason)
    return f"{said} by its provider for {max(0.0, state.held_until - now):.0f}s more"


def over_limit_targets(
    spec: JobSpec, view: ClusterView, limits: Mapping[str, ProviderLimits]
) -> dict[str, str]:
    """Backends (``node/backend``) whose provider, or the job's model there, is at its
    configured rate limit in this minute, with the reason: the router sends them nothing."""
    out: dict[str, str] = {}
    for node in view.nodes:
        for backend in node.info.backends:
            scopes = limit_scopes(limits, backend.kind, spec.model or "")
            if not scopes:
                continue
            over = over_limit(scopes, view.rate_counters, view.redis_time)
            if over is not None:
                out[backend_target(node.name, backend.name)] = describe_refusal(*over)
    return out


def soonest_reopening(
    blocked: Collection[str],
    spec: JobSpec,
    view: ClusterView,
    limits: Mapping[str, ProviderLimits],
) -> float | None:
    """Seconds until the first of the ``blocked`` backends held by its provider or by a
    configured limit may take this job again; None when none is (nobody knows when a plain
    breaker's cause ends)."""
    now = view.redis_time
    waits = [
        state.held_until - now
        for target in blocked
        if (state := view.breakers.get(target)) is not None
        and state.held_until is not None
        and state.held_until > now
    ]
    for node in view.nodes:
        for backend in node.info.backends:
            if backend_target(node.name, backend.name) not in blocked:
                continue
            scopes = limit_scopes(limits, backend.kind, spec.model or "")
            over = over_limit(scopes, view.rate_counters, now) if scopes else None
            if over is not None:
                waits.append(over[2])
    return min(waits) if waits else None


def half_open_targets(candidate: Candidate, phases: Mapping[str, BreakerPhase]) -> list[str]:
    """The candidate's targets whose breaker is half-open: each needs its probe permit."""
    return [
        t
        for t in (candidate.node, candidate.backend_target)
        if phases.get(t) is BreakerPhase.HALF_OPEN
    ]


NO_PROBE_PERMIT = "every node that could serve this job is behind a circuit breaker being probed"


RATE_LIMIT_CODES = frozenset({"rate_limited", "quota_exhausted"})
"""Failures that open their breaker at once: a rate-limited route stays rate limited for a
while, so the next jobs go to the next route (or tier) without trying it first."""

MAX_REASON = 1000
"""``JobAssignment.reason``'s limit."""


def failure_target(candidate: Candidate, code: str) -> str:
    """The breaker a failed attempt counts against: the node's, or its backend's."""
    if code in NODE_FAILURE_CODES:
        return candidate.node
    return backend_target(candidate.node, candidate.backend)


HOLDING_CODES = frozenset({"quota_exhausted"})
"""Final failures that still shut their backend: a spent quota is spent for every job."""


def breaker_hold(
    code: str, retry_after: float | None, quota_cooldown_s: float
) -> tuple[float, str] | None:
    """How long a failed attempt's breaker stays open and why, when its provider said how long
    (a 429's or 529's Retry-After, a quota's reset); None: count it as an ordinary failure.
    A spent quota without a reset time holds for ``quota_cooldown_s``."""
    if code == "quota_exhausted":
        return (retry_after if retry_after else quota_cooldown_s), "quota_exhausted"
    if retry_after is None:
        return None
    if code == "rate_limited":
        return retry_after, "rate_limited"
    if code == "backend_unavailable":
        return retry_after, "overloaded"
    return None


def success_targets(candidate: Candidate, view: ClusterView) -> list[str]:
    """Breakers a first token resets: only those with an entry (no round trip per job)."""
    return [t for t in (candidate.node, candidate.backend_target) if t in view.breakers]


@dataclass(frozen=True)
class TaskMessage:
    """One Celery ``send_task`` call, ready to make."""

    name: str
    kwargs: dict[str, Any]


def job_task(spec: JobSpec, candidate: Candidate, attempt: int) -> TaskMessage:
    """The ``corral.run_job`` message for this attempt, on the candidate node's queue."""
    assignment = JobAssignment(
        spec=spec,
        node=candidate.node,
        backend=candidate.backend,
        model=candidate.model,
        attempt=attempt,
        tier=candidate.tier,
        reason=candidate.reason[:MAX_REASON] if candidate.reason else None,
    )
    priority = (
        names.INTERACTIVE_PRIORITY if spec.priority == "interactive" else names.BATCH_PRIORITY
    )
    return TaskMessage(
        names.RUN_JOB_TASK,
        {
            "args": [assignment.model_dump(mode="json")],
            "task_id": spec.job_id,
            "queue": names.node_queue(candidate.node),
            "priority": priority,
            "argsrepr": assignment.argsrepr(),
            "kwargsrepr": "{}",
            "ignore_result": True,
        },
    )


def unreachable(exc: redis.exceptions.RedisError, url: str) -> BrokerUnavailable:
    """The error a user sees when Redis cannot be used (the URL without its password)."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return BrokerUnavailable(f"Redis at {redacted_url(url)} refused the password")
    return BrokerUnavailable(f"cannot reach Redis at {redacted_url(url)}: {type(exc).__name__}")


# Redis answers that mean it takes no writes for now: full (maxmemory under noeviction) or a
# replica not yet promoted; and kombu's error once its publish retries ran out.
WRITES_REFUSED: tuple[type[BaseException], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    kombu.exceptions.OperationalError,
)


def refused_write(exc: BaseException) -> BrokerUnavailable:
    """What a user is told when Redis refuses a write, naming the cause and the fix."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
        return BrokerUnavailable(
            "Redis is full (maxmemory reached under noeviction) and refuses writes: free memory"
            " or raise maxmemory; work goes on once it takes writes again"
        )
    if isinstance(exc, redis.exceptions.ReadOnlyError) or "READONLY" in str(exc):
        return BrokerUnavailable(
            "Redis is a read-only replica (a failover in progress?) and refuses writes"
        )
    return BrokerUnavailable(f"Redis refused the job's message: {type(exc).__name__}")


def full_broker_reason(memory_info: Mapping[str, Any]) -> str | None:
    """From INFO memory: why every node may look down (their heartbeats refused), or None."""
    maxmemory = int(memory_info.get("maxmemory", 0) or 0)
    used = int(memory_info.get("used_memory", 0) or 0)
    if maxmemory and used >= maxmemory:
        return (
            f"Redis is full ({used / 2**20:.1f} MiB used of maxmemory {maxmemory / 2**20:.1f} MiB)"
            " and refuses writes, heartbeats included, so every node looks down: free memory or"
            " raise maxmemory"
        )
    return None
