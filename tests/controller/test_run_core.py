"""The job run's decisions without Redis: move, interrupt or end, driven by scripted effects."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.errors import NoNodeAvailable
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    JobSpec,
    ReroutedEvent,
    StartedEvent,
    Timings,
)
from controller.embedding import make_embed_spec
from controller.router import Candidate
from controller.run_core import (
    Attempt,
    AttemptFailed,
    AttemptSucceeded,
    ChooseNext,
    Effect,
    Finished,
    RunCore,
    Send,
    Steps,
    Write,
)
from controller.stream_control import CLOSED_LEASE, TakeOver
from controller.stream_core import StreamCursor

JOB = "job-run-core"


def candidate(node: str, instance: str = "") -> Candidate:
    return Candidate(
        node=node,
        backend="sim",
        model="m",
        model_loaded=True,
        spare=1,
        load=0,
        instance=instance,
    )


def core(*, max_attempts: int = 3, retry_partial: bool = False) -> RunCore:
    spec = JobSpec(
        job_id=JOB,
        messages=(ChatMessage(role="user", content="hi"),),
        created_at=0,
        max_attempts=max_attempts,
        retry_partial=retry_partial,
    )
    return RunCore(spec, StreamCursor(JOB, node="a"), Attempt(1, candidate("a")))


@dataclass
class Script:
    """Performs effects as a shell would: routing answers and write outcomes come from lists."""

    routes: list[Candidate | NoNodeAvailable] = field(default_factory=list)
    writes: list[TakeOver] = field(default_factory=list)
    done: list[Effect] = field(default_factory=list)

    def run(self, steps: Steps) -> list[Effect]:
        result: object = None
        while True:
            try:
                effect = steps.send(result)
            except StopIteration:
                return self.done
            self.done.append(effect)
            if isinstance(effect, ChooseNext):
                result = self.routes.pop(0)
            elif isinstance(effect, Write):
                result = self.writes.pop(0) if self.writes else TakeOver.WRITTEN
            else:
                result = None


def written(effects: list[Effect]) -> list[AnyStreamEvent]:
    return [e.event for e in effects if isinstance(e, Write)]


def test_the_first_token_closes_the_breakers_once() -> None:
    run = core()
    script = Script()
    for seq in (1, 2):
        script.run(run.after(DeltaEvent(job_id=JOB, seq=seq, ts=0, text="x")))
    assert [type(e) for e in script.done] == [AttemptSucceeded]
    assert run.attempt.text == ["x", "x"]


def test_a_node_lost_before_its_first_token_moves_the_job_to_the_next_candidate() -> None:
    run = core()
    run.cursor.take(StartedEvent(job_id=JOB, seq=0, ts=0, node="a", backend="sim", model="m"))
    effects = Script(routes=[candidate("b", "wb")]).run(run.on_worker_lost("node 'a' died"))
    assert isinstance(effects[0], AttemptFailed) and effects[0].code == "node_lost"
    choose = effects[1]
    assert isinstance(choose, ChooseNext) and choose.avoid == {"a/sim"} and not choose.never
    (rerouted,) = written(effects)
    assert isinstance(rerouted, ReroutedEvent)
    assert (rerouted.seq, rerouted.attempt, rerouted.to_node) == (1, 2, "b")
    assert isinstance(effects[2], Write) and effects[2].new_lease == "2"
    sent = effects[-1]
    assert isinstance(sent, Send) and (sent.spec, sent.attempt) == (run.spec, 2)
    assert sent.candidate._replace(reason=None) == candidate("b", "wb")
    # The answer will say why it left the first route.
    assert sent.candidate.reason == "a/sim (local) failed: node 'a' died (attempt 1)"
    assert run.attempt.number == 2 and run.candidate.node == "b"


def test_a_node_lost_mid_answer_is_interrupted_with_the_partial_text() -> None:
    run = core()
    Script().run(run.after(DeltaEvent(job_id=JOB, seq=1, ts=0, text="half an ")))
    run.cursor.next_seq = 2
    effects = Script().run(run.on_worker_lost("node 'a' died"))
    (interrupted,) = written(effects)
    assert isinstance(interrupted, InterruptedEvent)
    assert interrupted.final and interrupted.partial_text == "half an "
    assert effects[-1] == Write(
        interrupted,
        attempt_seen=1,
        new_lease=CLOSED_LEASE,
        old_node="a",
        refuse_if_cancelled=True,
    )
    assert not any(isinstance(e, ChooseNext | Send) for e in effects)


def test_retry_partial_interrupts_then_moves() -> None:
    run = core(retry_partial=True)
    Script().run(run.after(DeltaEvent(job_id=JOB, seq=1, ts=0, text="half")))
    run.cursor.next_seq = 2
    effects = Script(routes=[candidate("b")]).run(run.on_worker_lost("gone"))
    interrupted, rerouted = written(effects)
    assert isinstance(interrupted, InterruptedEvent) and not interrupted.final
    assert isinstance(rerouted, ReroutedEvent) and rerouted.seq == 3
    assert isinstance(effects[-1], Send)


def test_nothing_else_to_route_to_ends_the_job_with_the_reason() -> None:
    run = core()
    failed = ErrorEvent(
        job_id=JOB, seq=1, ts=0, code="backend_unavailable", message="refused", final=False
    )
    run.cursor.next_seq = 2
    effects = Script(routes=[NoNodeAvailable("no up node")]).run(run.after(failed))
    choose = next(e for e in effects if isinstance(e, ChooseNext))
    assert choose.never == {"a/sim"}  # a backend that failed is never tried again
    (final,) = written(effects)
    assert isinstance(final, ErrorEvent) and final.final and final.seq == 2
    assert "refused; nothing else can serve it (no up node)" in final.message


def test_the_last_attempt_failing_ends_the_job_as_exhausted() -> None:
    run = core(max_attempts=1)
    effects = Script().run(run.on_worker_lost("node 'a' died"))
    (final,) = written(effects)
    assert isinstance(final, ErrorEvent) and final.code == "attempts_exhausted"
    assert "job failed on 1 attempt(s): a: node 'a' died" in final.message


def test_a_cancel_seen_in_the_same_step_writes_the_cancellation_instead() -> None:
    run = core()
    effects = Script(routes=[candidate("b")], writes=[TakeOver.CANCELLED, TakeOver.WRITTEN]).run(
        run.on_worker_lost("gone")
    )
    refused, cancelled = written(effects)
    assert isinstance(refused, ReroutedEvent)
    assert isinstance(cancelled, ErrorEvent) and cancelled.code == "cancelled"
    assert not any(isinstance(e, Send) for e in effects)  # nothing is sent anywhere
    assert run.attempt.number == 1


def test_a_move_to_the_current_attempt_notes_the_new_worker_instance() -> None:
    run = core()
    Script(routes=[candidate("b", "wb")]).run(run.on_worker_lost("gone"))
    moved = ReroutedEvent(job_id=JOB, seq=1, ts=0, attempt=2, from_node="a", to_node="b", reason="")
    run.cursor.take(moved)
    Script().run(run.after(moved))
    assert run.cursor.instance == "wb"


def test_an_embed_jobs_answer_closes_the_breakers_and_a_failed_one_does_not() -> None:
    spec = make_embed_spec(["a", "b"], model="m")
    result = JobResult(
        job_id=spec.job_id,
        status="ok",
        node="a",
        backend="sim",
        model="m",
        text="",
        timings=Timings(queued_ms=1, first_token_ms=2, total_ms=3),
        embeddings=((1.0,), (2.0,)),
    )
    done = DoneEvent(job_id=spec.job_id, seq=1, ts=0, result=result)
    run = RunCore(spec, StreamCursor(spec.job_id, node="a"), Attempt(1, candidate("a")))
    effects = Script().run(run.after(done))
    assert [type(e) for e in effects] == [AttemptSucceeded, Finished]
    cancelled = done.model_copy(
        update={"result": result.model_copy(update={"status": "cancelled"})}
    )
    again = RunCore(spec, StreamCursor(spec.job_id, node="a"), Attempt(1, candidate("a")))
    assert [type(e) for e in Script().run(again.after(cancelled))] == [Finished]


def test_a_providers_retry_after_reaches_the_breaker_and_the_final_error() -> None:
    run = core()
    limited = ErrorEvent(
        job_id=JOB, seq=1, ts=0, code="rate_limited", message="429", final=False, retry_after=2
    )
    run.cursor.next_seq = 2
    effects = Script(routes=[NoNodeAvailable("no up node")]).run(run.after(limited))
    assert effects[0] == AttemptFailed(candidate("a"), "rate_limited", 2)
    (final,) = written(effects)
    assert isinstance(final, ErrorEvent) and final.retry_after == 2


def test_corrals_own_limit_opens_no_breaker_but_the_job_still_moves_on() -> None:
    run = core()
    refused = ErrorEvent(
        job_id=JOB,
        seq=1,
        ts=0,
        code="rate_limited",
        message="not sent: anthropic is at its configured rpm of 2",
        final=False,
        retry_after=41,
        limit="anthropic",
    )
    effects = Script(routes=[candidate("b")]).run(run.after(refused))
    assert not any(isinstance(e, AttemptFailed) for e in effects)
    choose = next(e for e in effects if isinstance(e, ChooseNext))
    assert choose.never == {"a/sim"}
    sent = effects[-1]
    assert isinstance(sent, Send) and sent.attempt == 2
    assert sent.candidate._replace(reason=None) == candidate("b")
    # The next route says why the first was passed over.
    assert sent.candidate.reason is not None and "configured rpm of 2" in sent.candidate.reason


def test_a_spent_quota_shuts_its_backend_and_moves_the_job_to_the_next_route() -> None:
    run = core()
    spent = ErrorEvent(
        job_id=JOB, seq=1, ts=0, code="quota_exhausted", message="quota is exhausted", final=False
    )
    effects = Script(routes=[candidate("b")]).run(run.after(spent))
    assert effects[0] == AttemptFailed(candidate("a"), "quota_exhausted", None)
    choose = next(e for e in effects if isinstance(e, ChooseNext))
    assert choose.never == {"a/sim"}
    sent = effects[-1]
    assert isinstance(sent, Send) and sent.attempt == 2
    assert sent.candidate.reason is not None and "quota is exhausted" in sent.candidate.reason


def test_a_spent_quota_with_nothing_else_to_serve_ends_the_job_with_its_code() -> None:
    run = core()
    spent = ErrorEvent(
        job_id=JOB, seq=1, ts=0, code="quota_exhausted", message="quota is exhausted", final=False
    )
    run.cursor.next_seq = 2
    effects = Script(routes=[NoNodeAvailable("no up node")]).run(run.after(spent))
    assert effects[0] == AttemptFailed(candidate("a"), "quota_exhausted", None)
    (final,) = written(effects)
    assert isinstance(final, ErrorEvent) and final.final and final.code == "quota_exhausted"
