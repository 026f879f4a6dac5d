"""Fan-out without Redis: which nodes are asked, how each job's events become its column,
and what the side-by-side answer looks like."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from rich.console import Console, RenderableType

from broker.errors import NoNodeAvailable, UnknownModel
from broker.schemas import (
    AnyStreamEvent,
    BackendInfo,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    JobSpec,
    ModelInfo,
    NodeInfo,
    ReroutedEvent,
    StartedEvent,
    Timings,
    Usage,
)
from controller.cli.fanout_tables import answers_table, progress_table
from controller.client import CorralClient
from controller.fanout import (
    FanoutJob,
    apply_event,
    distinct_node_candidates,
    fanout_candidates,
    fanout_jobs,
    first_failure,
    model_jobs,
    start_jobs,
    wait_for,
)
from controller.router import Candidate, NodeState


def render(renderable: RenderableType, width: int = 100) -> str:
    out = io.StringIO()
    Console(file=out, width=width, highlight=False, color_system=None).print(renderable)
    return out.getvalue()


def node(
    name: str, models: dict[str, bool], *, up: bool = True, backends: int = 1, in_flight: int = 0
) -> NodeState:
    info = NodeInfo(
        name=name,
        version="0",
        backends=tuple(
            BackendInfo(
                name=f"b{i}",
                kind="ollama",
                healthy=True,
                capacity=4,
                in_flight=in_flight,
                models=tuple(ModelInfo(name=m, loaded=loaded) for m, loaded in models.items()),
            )
            for i in range(backends)
        ),
        in_flight=in_flight,
        capacity=4,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=time.time(),
    )
    return NodeState(info=info, up=up)


def spec(model: str | None = None, node: str | None = None) -> JobSpec:
    return JobSpec(
        job_id="job-00000001",
        messages=(ChatMessage(role="user", content="why is the sky blue"),),
        model=model,
        node=node,
        created_at=0,
    )


def candidate(node_name: str, backend: str = "ollama", model: str = "llama3.1:8b") -> Candidate:
    return Candidate(
        node=node_name, backend=backend, model=model, model_loaded=True, spare=1, load=0
    )


# --- which jobs ----------------------------------------------------------------------------


def test_distinct_node_candidates_keep_the_best_per_node_in_rank_order() -> None:
    ranked = [
        candidate("gpu1", "ollama"),
        candidate("gpu1", "vllm"),
        candidate("pi2"),
        candidate("nuc"),
    ]
    picked = distinct_node_candidates(ranked, 2)
    assert [(c.node, c.backend) for c in picked] == [("gpu1", "ollama"), ("pi2", "ollama")]
    assert [c.node for c in distinct_node_candidates(ranked, 5)] == ["gpu1", "pi2", "nuc"]


def test_fanout_candidates_are_the_best_nodes_that_have_the_model_and_are_up() -> None:
    nodes = [
        node("cold", {"llama3.1:8b": False}),
        node("warm", {"llama3.1:8b": True}, backends=2),
        node("other", {"phi3:mini": True}),
        node("down", {"llama3.1:8b": True}, up=False),
        node("busy", {"llama3.1:8b": True}, in_flight=3),
    ]
    picked = fanout_candidates(spec(model="llama3.1:8b"), nodes, 3)
    assert [c.node for c in picked] == ["warm", "busy", "cold"]


def test_fanout_candidates_leave_out_targets_behind_open_breakers() -> None:
    nodes = [node("a", {"m": True}), node("b", {"m": True}), node("c", {"m": True})]
    picked = fanout_candidates(spec(), nodes, 3, blocked={"a", "b/b0"})
    assert [c.node for c in picked] == ["c"]


def test_fanout_candidates_explain_why_nothing_can_serve() -> None:
    with pytest.raises(UnknownModel, match="'mistral:7b' is not installed"):
        fanout_candidates(spec(model="mistral:7b"), [node("a", {"m": True})], 2)
    with pytest.raises(NoNodeAvailable):
        fanout_candidates(spec(), [node("a", {"m": True}, up=False)], 2)


def test_fanout_jobs_hold_each_job_to_its_node_with_its_own_id() -> None:
    original = spec()
    jobs = fanout_jobs(original, [candidate("gpu1"), candidate("pi2", model="phi3:mini")])
    assert [(j.index, j.label, j.spec.node) for j in jobs] == [
        (1, "gpu1", "gpu1"),
        (2, "pi2", "pi2"),
    ]
    assert len({j.spec.job_id for j in jobs} | {original.job_id}) == 3
    assert all(j.spec.messages == original.messages for j in jobs)
    assert jobs[1].model == "phi3:mini"  # known before it starts, for the live table


def test_model_jobs_are_one_per_model_routed_as_usual() -> None:
    jobs = model_jobs(spec(), ["llama3.1:8b", "phi3:mini", "llama3.1:8b"])
    assert [(j.label, j.spec.model, j.spec.node) for j in jobs] == [
        ("llama3.1:8b", "llama3.1:8b", None),
        ("phi3:mini", "phi3:mini", None),
    ]
    assert jobs[0].spec.job_id != jobs[1].spec.job_id


# --- what happened -------------------------------------------------------------------------


def _e(kind: type[Any], seq: int, **fields: Any) -> Any:
    return kind(job_id="job-00000001", seq=seq, ts=0.0, **fields)


def result(text: str, tokens: int, node_name: str = "gpu1") -> JobResult:
    return JobResult(
        job_id="job-00000001",
        status="ok",
        node=node_name,
        backend="ollama",
        model="llama3.1:8b",
        text=text,
        usage=Usage(completion_tokens=tokens),
        timings=Timings(queued_ms=1, first_token_ms=2, total_ms=3),
    )


def test_events_fill_in_the_jobs_column() -> None:
    job = FanoutJob(index=1, label="gpu1", spec=spec(), sent_at=100.0)
    apply_event(job, _e(StartedEvent, 0, node="gpu1", backend="ollama", model="llama3.1:8b"), 100.1)
    assert job.state == "running"
    apply_event(job, _e(DeltaEvent, 1, text="Rayleigh"), 100.25)
    apply_event(job, _e(DeltaEvent, 2, text=" scattering"), 100.3)
    assert (job.text, job.tokens) == ("Rayleigh scattering", 2)
    assert job.first_token_s == pytest.approx(0.25)
    apply_event(job, _e(DoneEvent, 3, result=result("Rayleigh scattering.", 3)), 101.5)
    assert job.state == "done" and job.succeeded
    assert (job.text, job.tokens, job.model) == ("Rayleigh scattering.", 3, "llama3.1:8b")
    assert job.total_s == pytest.approx(1.5)


def test_a_move_to_another_node_restarts_the_answer_there() -> None:
    job = FanoutJob(index=1, label="llama3.1:8b", spec=spec(), sent_at=0.0)
    apply_event(job, _e(StartedEvent, 0, node="pi2", backend="ollama", model="llama3.1:8b"), 0.1)
    apply_event(job, _e(DeltaEvent, 1, text="half an ans"), 0.2)
    apply_event(
        job,
        _e(
            InterruptedEvent,
            2,
            code="node_lost",
            message="node 'pi2' stopped heartbeating",
            node="pi2",
            attempt=1,
            partial_text="half an ans",
            final=False,
        ),
        0.3,
    )
    apply_event(
        job,
        _e(ReroutedEvent, 3, attempt=2, from_node="pi2", to_node="gpu1", reason="lost"),
        0.3,
    )
    assert (job.node, job.state, job.text, job.tokens) == ("gpu1", "queued", "", 0)


def test_a_final_error_fails_the_job_with_the_right_error_class() -> None:
    job = FanoutJob(index=2, label="pi2", spec=spec(), sent_at=0.0)
    apply_event(
        job,
        _e(ErrorEvent, 0, code="backend_unavailable", message="connection refused", node="pi2"),
        2.0,
    )
    assert job.state == "failed" and not job.succeeded
    assert job.error is not None and job.error.code == "backend_unavailable"
    assert job.total_s == 2.0
    cancelled = FanoutJob(index=3, label="nuc", spec=spec(), sent_at=0.0)
    apply_event(cancelled, _e(ErrorEvent, 0, code="cancelled", message="job cancelled"), 1.0)
    assert cancelled.state == "cancelled"


def test_first_failure_is_the_leftmost_job_that_did_not_succeed() -> None:
    done = FanoutJob(index=1, label="a", spec=spec(), state="done")
    failed = FanoutJob(index=2, label="b", spec=spec(), state="failed")
    cancelled = FanoutJob(index=3, label="c", spec=spec(), state="cancelled")
    assert first_failure([done, failed, cancelled]) is failed
    assert first_failure([done]) is None


# --- how it looks --------------------------------------------------------------------------


def columns_of(text: str) -> dict[str, dict[str, str]]:
    """The side-by-side table read back: column header -> row label -> its text, unwrapped."""
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    labels = [cell.strip() for cell in header.strip("┃").split("┃")][1:]
    columns: dict[str, dict[str, str]] = {label: {} for label in labels}
    row = ""
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        first, *rest = (cell.strip() for cell in line.strip("│").split("│"))
        row = first or row
        for label, cell in zip(labels, rest, strict=True):
            joined = f"{columns[label].get(row, '')} {cell}"
            columns[label][row] = " ".join(joined.split())
    return columns


def test_answers_sit_side_by_side_with_where_and_how_fast() -> None:
    first = FanoutJob(
        index=1,
        label="gpu1",
        spec=spec(),
        node="gpu1",
        backend="ollama",
        model="llama3.1:8b",
        state="done",
        parts=["Because air scatters blue light [more] than red light, the sky looks blue."],
        tokens=16,
        first_token_s=0.182,
        total_s=4.31,
    )
    second = FanoutJob(index=2, label="pi2", spec=spec(), node="pi2", model="phi3:mini")
    apply_event(second, _e(DeltaEvent, 0, text="Short waves"), 0.0)
    apply_event(
        second,
        _e(ErrorEvent, 1, code="node_lost", message="node 'pi2' stopped heartbeating"),
        0.0,
    )
    text = render(answers_table([first, second]))
    columns = columns_of(text)
    assert set(columns) == {"1. gpu1", "2. pi2"}
    assert columns["1. gpu1"]["answer"] == (
        "Because air scatters blue light [more] than red light, the sky looks blue."
    )
    assert columns["1. gpu1"]["node"] == "gpu1"
    assert columns["1. gpu1"]["model"] == "llama3.1:8b"
    assert columns["1. gpu1"]["first token"] == "182 ms"
    assert columns["1. gpu1"]["total"] == "4.31 s"
    assert columns["1. gpu1"]["tokens"] == "16"
    # The failed job keeps what it had written and says why it stopped, in its own column.
    assert columns["2. pi2"]["answer"] == ("Short waves ✗ failed: node 'pi2' stopped heartbeating")
    assert columns["2. pi2"]["state"] == "failed"
    assert columns["2. pi2"]["first token"] == "-"


def test_the_live_table_has_a_row_per_job_with_its_tokens_so_far() -> None:
    running = FanoutJob(
        index=1, label="gpu1", spec=spec(), node="gpu1", model="llama3.1:8b", state="running"
    )
    running.tokens = 42
    waiting = FanoutJob(index=2, label="phi3:mini", spec=spec(), model="phi3:mini")
    rows = [
        re.split(r"\s{2,}", line.strip())
        for line in render(progress_table([running, waiting])).splitlines()
        if re.match(r"\s+\d\s", line)
    ]
    assert rows == [
        ["1", "gpu1", "llama3.1:8b", "42", "-", "running"],
        ["2", "-", "phi3:mini", "0", "-", "waiting"],
    ]


# --- running them, against a stand-in client ----------------------------------------------


@dataclass
class _Run:
    candidate: Candidate
    script: list[AnyStreamEvent]

    def events(self, timeout_s: float) -> Iterator[AnyStreamEvent]:
        yield from self.script


class _Client:
    """Answers ``submit`` like CorralClient: a run to follow, or the routing error."""

    def __init__(self) -> None:
        self.submitted: list[JobSpec] = []

    def submit(self, job_spec: JobSpec) -> _Run:
        self.submitted.append(job_spec)
        if job_spec.model == "missing:1b":
            raise UnknownModel("model 'missing:1b' is not installed on any node")
        started = _e(StartedEvent, 0, node="gpu1", backend="ollama", model=job_spec.model)
        words = [_e(DeltaEvent, 1, text="blue"), _e(DoneEvent, 2, result=result("blue", 1))]
        return _Run(candidate("gpu1", model=job_spec.model or "-"), [started, *words])


def test_start_jobs_runs_every_job_and_a_refused_one_fails_alone() -> None:
    stand_in = _Client()
    jobs = model_jobs(spec(), ["llama3.1:8b", "missing:1b"])
    seen: list[tuple[int, str]] = []
    errors: list[tuple[int, str]] = []
    threads = start_jobs(
        cast(CorralClient, stand_in),
        jobs,
        timeout_s=5,
        on_event=lambda job, event: seen.append((job.index, event.type)),
        on_error=lambda job, exc: errors.append((job.index, exc.code)),
    )
    assert wait_for(jobs, timeout_s=5)
    for thread in threads:
        thread.join(timeout=1)
        assert not thread.is_alive()
    assert {s.model for s in stand_in.submitted} == {"llama3.1:8b", "missing:1b"}
    assert [e for e in seen if e[0] == 1] == [(1, "started"), (1, "delta"), (1, "done")]
    assert errors == [(2, "unknown_model")]
    assert jobs[0].succeeded and jobs[0].text == "blue"
    assert jobs[1].state == "failed" and first_failure(jobs) is jobs[1]
