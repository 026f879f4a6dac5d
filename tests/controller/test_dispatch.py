"""What both clients decide around a send, without Redis: breakers in the way, the message."""

from __future__ import annotations

from collections import Counter

import pytest

from broker import names
from broker.errors import NoNodeAvailable
from broker.ratelimits import ProviderLimits, RateCount
from broker.schemas import BackendInfo, ChatMessage, JobSpec, ModelInfo, NodeInfo
from controller.breaker import BreakerPhase, BreakerState
from controller.cluster import ClusterView
from controller.dispatch import (
    breaker_hold,
    breaker_phases,
    failure_target,
    half_open_targets,
    job_task,
    preferred_candidates,
    with_sent,
)
from controller.node_index import NodeIndex
from controller.router import NodeState

SECRET_PROMPT = "my bank password is hunter2"


def state(
    name: str,
    *,
    queued: int = 0,
    backend_kind: str = "simulated",
    quota_left: float | None = None,
) -> NodeState:
    backend = BackendInfo(
        name="sim" if backend_kind == "simulated" else "claude",
        kind=backend_kind,
        url="http://127.0.0.1:1",
        healthy=True,
        capacity=4,
        models=(ModelInfo(name="m", loaded=True),),
        quota_left=quota_left,
    )
    info = NodeInfo(
        name=name,
        version="test",
        backends=(backend,),
        in_flight=0,
        capacity=4,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=0,
    )
    return NodeState(info=info, up=True, queued=queued)


def spec() -> JobSpec:
    return JobSpec(
        job_id="job-dispatch",
        messages=(ChatMessage(role="user", content=SECRET_PROMPT),),
        created_at=0,
    )


def view(breakers: dict[str, BreakerState] | None = None) -> ClusterView:
    nodes = NodeIndex([state("a"), state("b")])
    return ClusterView(nodes=nodes, breakers=breakers or {}, redis_time=100.0)


def test_jobs_sent_since_the_read_count_as_queued_so_a_burst_spreads() -> None:
    spread = with_sent(view(), Counter({"a": 3}))
    assert {n.name: n.queued for n in spread.nodes} == {"a": 3, "b": 0}
    assert preferred_candidates(spec(), spread, {}, aliases={})[0].node == "b"


def test_an_open_breaker_keeps_its_node_out_and_a_half_open_one_needs_a_probe() -> None:
    breakers = {
        "a": BreakerState(open=True, failures=3, opened_at=99.0),  # cooling down
        "b/sim": BreakerState(open=True, failures=3, opened_at=50.0),  # cooled: half-open
    }
    phases = breaker_phases(view(breakers), cooldown_s=30)
    assert phases == {"a": BreakerPhase.OPEN, "b/sim": BreakerPhase.HALF_OPEN}
    (only,) = preferred_candidates(spec(), view(breakers), phases, aliases={})
    assert only.node == "b" and half_open_targets(only, phases) == ["b/sim"]
    with pytest.raises(NoNodeAvailable):
        preferred_candidates(spec(), view(breakers), phases, aliases={}, never={"b/sim"})


def test_avoided_targets_come_last_but_still_come() -> None:
    ranked = preferred_candidates(spec(), view(), {}, aliases={}, avoid={"a/sim", "b/sim"})
    assert {c.node for c in ranked} == {"a", "b"}
    assert [
        c.node for c in preferred_candidates(spec(), view(), {}, aliases={}, avoid={"a/sim"})
    ] == ["b"]


def test_a_lost_worker_counts_against_the_node_a_failed_backend_against_the_backend() -> None:
    (candidate, _) = preferred_candidates(spec(), view(), {}, aliases={})
    assert failure_target(candidate, "node_lost") == "a"
    assert failure_target(candidate, "backend_unavailable") == "a/sim"


def test_the_task_goes_to_the_node_queue_and_never_shows_the_prompt() -> None:
    (candidate, _) = preferred_candidates(spec(), view(), {}, aliases={})
    task = job_task(spec(), candidate, attempt=2)
    assert task.name == names.RUN_JOB_TASK
    assert task.kwargs["queue"] == names.node_queue("a")
    assert task.kwargs["task_id"] == "job-dispatch"
    assert task.kwargs["argsrepr"] == "job=job-dispatch node=a model=m attempt=2"
    assert SECRET_PROMPT not in task.kwargs["argsrepr"] + task.kwargs["kwargsrepr"]


def cloud_view(
    counters: dict[str, RateCount] | None = None, breakers: dict[str, BreakerState] | None = None
) -> ClusterView:
    nodes = NodeIndex([state("a"), state("c", backend_kind="anthropic")])
    return ClusterView(
        nodes=nodes, breakers=breakers or {}, redis_time=6015.0, rate_counters=counters or {}
    )


def test_a_provider_at_its_configured_limit_gets_nothing_and_the_error_says_why() -> None:
    limits = {"anthropic": ProviderLimits(rpm=2)}
    pinned = spec().model_copy(update={"node": "c"})
    full = cloud_view({"anthropic": RateCount(window=100, requests=2, tokens=0)})
    with pytest.raises(
        NoNodeAvailable, match=r"c/claude: anthropic is at its configured rpm of 2"
    ) as refused:
        preferred_candidates(pinned, full, {}, aliases={}, limits=limits)
    assert refused.value.retry_after == pytest.approx(45)  # the minute's end (6015 s is :15)
    # Other backends still serve, and last minute's count holds nothing back.
    assert [c.node for c in preferred_candidates(spec(), full, {}, aliases={}, limits=limits)] == [
        "a"
    ]
    stale = cloud_view({"anthropic": RateCount(window=99, requests=2, tokens=0)})
    assert preferred_candidates(pinned, stale, {}, aliases={}, limits=limits)[0].node == "c"


def test_a_held_breaker_says_how_long_its_provider_asked_for() -> None:
    held = {
        "c/claude": BreakerState(
            open=True, failures=1, opened_at=6014.0, held_until=6017.0, reason="rate_limited"
        )
    }
    pinned = spec().model_copy(update={"node": "c"})
    phases = breaker_phases(cloud_view(breakers=held), cooldown_s=30)
    assert phases == {"c/claude": BreakerPhase.OPEN}
    with pytest.raises(
        NoNodeAvailable, match="c/claude: rate limited by its provider for 2s more"
    ) as refused:
        preferred_candidates(pinned, cloud_view(breakers=held), phases, aliases={})
    assert refused.value.retry_after == pytest.approx(2)  # for the gateway's Retry-After
    # Past its hold (not the 30 s cooldown), it is half-open.
    later = cloud_view(breakers=held)
    later = ClusterView(nodes=later.nodes, breakers=held, redis_time=6017.5)
    assert breaker_phases(later, cooldown_s=30) == {"c/claude": BreakerPhase.HALF_OPEN}


@pytest.mark.parametrize(
    ("code", "retry_after", "hold"),
    [
        ("rate_limited", 2.0, (2.0, "rate_limited")),
        ("backend_unavailable", 5.0, (5.0, "overloaded")),  # a 529 with Retry-After
        ("quota_exhausted", None, (3600.0, "quota_exhausted")),  # no reset: the default
        ("quota_exhausted", 120.0, (120.0, "quota_exhausted")),
        ("rate_limited", None, None),  # no advice: an ordinary failure
        ("backend_timeout", None, None),
    ],
)
def test_which_failures_hold_their_breaker_and_for_how_long(
    code: str, retry_after: float | None, hold: tuple[float, str] | None
) -> None:
    assert breaker_hold(code, retry_after, quota_cooldown_s=3600) == hold


def test_within_a_paid_tier_the_route_with_the_most_quota_left_comes_first() -> None:
    nodes = NodeIndex(
        [
            state("a", backend_kind="anthropic", quota_left=0.1),
            state("b", backend_kind="anthropic", quota_left=0.6),
            state("c", backend_kind="anthropic", queued=2),  # says nothing: counts as all left
        ]
    )
    quota_view = ClusterView(nodes=nodes, breakers={}, redis_time=100.0)
    ranked = preferred_candidates(spec(), quota_view, {}, aliases={})
    assert [c.node for c in ranked] == ["c", "b", "a"]


def test_local_routes_keep_the_routers_order_whatever_a_cloud_route_says() -> None:
    nodes = NodeIndex(
        [
            state("pi", queued=1),
            state("gpu"),
            state("cloud", backend_kind="anthropic", quota_left=1),
        ]
    )
    quota_view = ClusterView(nodes=nodes, breakers={}, redis_time=100.0)
    ranked = preferred_candidates(spec(), quota_view, {}, aliases={})
    assert [c.node for c in ranked] == ["gpu", "pi", "cloud"]
