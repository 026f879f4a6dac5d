"""What both clients decide around a send, without Redis: breakers in the way, the message."""

from __future__ import annotations

from collections import Counter

import pytest

from broker import names
from broker.errors import NoNodeAvailable
from broker.schemas import BackendInfo, ChatMessage, JobSpec, ModelInfo, NodeInfo
from controller.breaker import BreakerPhase, BreakerState
from controller.cluster import ClusterView
from controller.dispatch import (
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


def state(name: str, *, queued: int = 0) -> NodeState:
    backend = BackendInfo(
        name="sim",
        kind="simulated",
        url="http://127.0.0.1:1",
        healthy=True,
        capacity=4,
        models=(ModelInfo(name="m", loaded=True),),
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
