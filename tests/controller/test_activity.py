"""The numbers behind `corral top`: rates from two heartbeats, jobs since start, totals."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from broker.nodeload import inventory_digest, load_of, with_load
from broker.schemas import BackendInfo, JobCounters, NodeInfo
from controller.activity import ActivityTracker, Reading, rate_between, totals_of
from controller.breaker import BreakerPhase
from controller.cli.render import BreakerNote
from controller.cli.top import top_frame
from controller.router import NodeState


def node(
    name: str,
    sent_at: float,
    tokens: int,
    *,
    up: bool = True,
    instance: str = "i1",
    done: int = 0,
    failed: int = 0,
    queued: int = 0,
    in_flight: int = 0,
) -> NodeState:
    backend = BackendInfo(
        name="sim",
        kind="simulated",
        healthy=True,
        capacity=2,
        in_flight=in_flight,
        counters=JobCounters(tokens_out=tokens, jobs_done=done, jobs_failed=failed),
    )
    info = NodeInfo(
        name=name,
        version="0",
        instance=instance,
        backends=(backend,),
        in_flight=in_flight,
        capacity=2,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=sent_at,
    )
    return NodeState(info=info, up=up, queued=queued)


def test_a_rate_is_tokens_over_the_time_between_two_beats() -> None:
    older = Reading("i1", 100.0, JobCounters(tokens_out=50))
    newer = Reading("i1", 102.0, JobCounters(tokens_out=130))
    assert rate_between(older, newer) == pytest.approx(40.0)


def test_no_rate_across_a_restart_or_from_one_beat_twice() -> None:
    older = Reading("i1", 100.0, JobCounters(tokens_out=500))
    assert rate_between(older, Reading("i2", 102.0, JobCounters(tokens_out=10))) is None
    assert rate_between(older, older) is None


def test_the_tracker_needs_a_second_beat_and_ignores_reads_between_beats() -> None:
    tracker = ActivityTracker()
    [first] = tracker.update([node("a", 100.0, 0)])
    assert first.tokens_per_s is None  # one beat: no rate yet
    [same] = tracker.update([node("a", 100.0, 0)])
    assert same.tokens_per_s is None  # read again before the next beat
    [second] = tracker.update([node("a", 102.0, 60)])
    assert second.tokens_per_s == pytest.approx(30.0)
    [idle] = tracker.update([node("a", 104.0, 60)])
    assert idle.tokens_per_s == pytest.approx(15.0)  # over the window: 60 tokens in 4 s


def test_the_rate_spans_the_window_and_forgets_older_beats() -> None:
    tracker = ActivityTracker(window_s=4.0)
    tracker.update([node("a", 0.0, 0)])
    tracker.update([node("a", 2.0, 200)])  # a burst, then quiet
    tracker.update([node("a", 4.0, 200)])
    tracker.update([node("a", 6.0, 200)])
    [later] = tracker.update([node("a", 8.0, 200)])
    assert later.tokens_per_s == pytest.approx(0.0)


def test_a_restarted_worker_starts_its_rate_again() -> None:
    tracker = ActivityTracker()
    tracker.update([node("a", 100.0, 900)])
    tracker.update([node("a", 102.0, 1000)])
    [restarted] = tracker.update([node("a", 103.0, 5, instance="i2")])
    assert restarted.tokens_per_s is None
    [then] = tracker.update([node("a", 105.0, 25, instance="i2")])
    assert then.tokens_per_s == pytest.approx(10.0)


def test_a_down_node_has_no_rate_and_its_slots_leave_the_totals() -> None:
    tracker = ActivityTracker()
    tracker.update([node("a", 100.0, 0), node("b", 100.0, 0)])
    nodes = tracker.update(
        [
            node("a", 102.0, 40, done=3, failed=1, queued=2, in_flight=1),
            node("b", 102.0, 100, up=False, done=5, queued=4, in_flight=2),
        ]
    )
    assert nodes[1].tokens_per_s is None
    totals = totals_of(nodes)
    assert (totals.nodes, totals.nodes_up) == (2, 1)
    assert (totals.in_flight, totals.capacity) == (1, 2)
    assert totals.queued == 6  # the down node's queue still waits
    assert totals.tokens_per_s == pytest.approx(20.0)
    assert (totals.jobs_done, totals.jobs_failed) == (8, 1)


def test_counters_travel_in_the_load_without_changing_the_inventory() -> None:
    before = node("a", 1.0, 0).info
    after = node("a", 2.0, 77, done=4, failed=1).info
    assert inventory_digest(before) == inventory_digest(after)
    load = load_of(after, inventory_digest(after))
    applied = with_load(before, load)
    assert applied.backends[0].counters == JobCounters(tokens_out=77, jobs_done=4, jobs_failed=1)


def test_a_frame_hides_the_password_greys_down_nodes_and_shows_breakers() -> None:
    tracker = ActivityTracker()
    tracker.update([node("alpha", 100.0, 0), node("beta", 50.0, 0)])
    nodes = tracker.update(
        [node("alpha", 102.0, 84, done=2, queued=3), node("beta", 50.0, 0, up=False)]
    )
    notes = {"alpha/sim": BreakerNote("alpha/sim", BreakerPhase.OPEN, 5, 12.0)}
    console = Console(width=140, record=True, color_system="truecolor", file=io.StringIO())
    console.print(top_frame(nodes, notes, "redis://:hunter2@nas.lan:6379/0", now=110.0))
    text = console.export_text()
    assert "hunter2" not in text and "redis://***@nas.lan:6379/0" in text
    assert "nodes 1/2 up" in text and "42.0 tok/s" in text and "breakers 1 open" in text
    alpha = next(line for line in text.splitlines() if "alpha" in line)
    assert alpha.split()[:8] == ["alpha", "up", "3", "sim", "(simulated)", "0/2", "42.0", "2"]
    assert "breaker open (12s)" in alpha
    beta = next(line for line in text.splitlines() if "beta" in line)
    assert "down, seen 60s ago" in beta
    # Greyed: the down node's row is drawn dim, the live one's is not.
    segments = console.render(top_frame(nodes, {}, "redis://x", 110.0))
    dim_text = "".join(seg.text for seg in segments if seg.style and seg.style.dim)
    assert "beta" in dim_text and "alpha" not in dim_text


def test_a_frame_keeps_to_the_rows_that_fit_and_says_how_many_are_left_out() -> None:
    nodes = ActivityTracker().update([node(f"n{i}", 1.0, 0) for i in range(5)])
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(top_frame(nodes, {}, "redis://x", now=2.0, max_rows=2))
    text = console.export_text()
    assert "n0" in text and "n1" in text and "n2" not in text
    assert "… and 3 more nodes (counted in the totals)" in text
    assert "nodes 5/5 up" in text
