"""How the chat REPL shows one answer's events and records how it ended, without a terminal."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from broker.errors import UnknownNode
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    ReroutedEvent,
    StartedEvent,
    Timings,
    Usage,
)
from broker.settings import build_settings
from controller.cli import cli
from controller.cli.chat import ChatRepl
from controller.cli.chat_answer import Answer, AnswerPrinter
from controller.cli.conversation import Conversation
from controller.client import CorralClient

JOB = "job00000001"


def started(node: str, seq: int = 0) -> StartedEvent:
    return StartedEvent(job_id=JOB, seq=seq, ts=0, node=node, backend="sim", model="sim-small")


def delta(text: str, seq: int) -> DeltaEvent:
    return DeltaEvent(job_id=JOB, seq=seq, ts=0, text=text)


def done(text: str, seq: int, node: str = "beta") -> DoneEvent:
    result = JobResult(
        job_id=JOB,
        status="ok",
        node=node,
        backend="sim",
        model="sim-small",
        text=text,
        usage=Usage(prompt_tokens=9, completion_tokens=2),
        timings=Timings(queued_ms=1, first_token_ms=2, total_ms=3),
    )
    return DoneEvent(job_id=JOB, seq=seq, ts=0, result=result)


def play(events: list[AnyStreamEvent]) -> tuple[Answer | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    printer = AnswerPrinter(out, Console(file=err, width=200, highlight=False))
    answer = None
    for event in events:
        answer = printer.take(event)
    return answer, out.getvalue(), err.getvalue()


def test_tokens_print_as_they_come_and_done_gives_the_answer() -> None:
    answer, out, err = play(
        [started("beta"), delta("Hi", 1), delta(" there", 2), done("Hi there", 3)]
    )
    assert out == "Hi there\n" and err == ""
    assert answer is not None and answer.outcome == "done" and answer.text == "Hi there"
    assert (answer.node, answer.model) == ("beta", "sim-small")
    assert answer.first_token_ms is not None and answer.result is not None


def test_a_move_to_another_node_is_noted_and_the_answer_starts_over() -> None:
    answer, out, err = play(
        [
            started("alpha"),
            ErrorEvent(
                job_id=JOB,
                seq=1,
                ts=0,
                code="backend_unavailable",
                message="refused",
                node="alpha",
                final=False,
            ),
            ReroutedEvent(
                job_id=JOB,
                seq=2,
                ts=0,
                attempt=2,
                from_node="alpha",
                to_node="beta",
                reason="refused",
            ),
            started("beta", 3),
            delta("Hi", 4),
            done("Hi", 5),
        ]
    )
    assert out == "Hi\n"
    assert "✗ alpha: refused" in err and "↻ moved to beta (attempt 2): refused" in err
    assert answer is not None and answer.outcome == "done" and answer.node == "beta"


@pytest.mark.parametrize(
    ("final", "outcome"),
    [
        (
            ErrorEvent(
                job_id=JOB, seq=2, ts=0, code="cancelled", message="job cancelled", node="alpha"
            ),
            "cancelled",
        ),
        (
            InterruptedEvent(
                job_id=JOB,
                seq=2,
                ts=0,
                code="backend_unavailable",
                message="connection dropped",
                node="alpha",
                attempt=1,
                partial_text="Half",
            ),
            "failed",
        ),
    ],
)
def test_an_answer_cut_short_keeps_its_partial_text(final: AnyStreamEvent, outcome: str) -> None:
    answer, out, _ = play([started("alpha"), delta("Half", 1), final])
    assert out == "Half\n"
    assert answer is not None and answer.outcome == outcome
    assert answer.text == "Half" and answer.node == "alpha"


@pytest.fixture
def repl(tmp_path: Path) -> Iterator[tuple[ChatRepl, io.StringIO]]:
    err = io.StringIO()
    # No Redis is reached: recording an answer only prints and updates the conversation.
    with CorralClient(build_settings(broker_url="redis://127.0.0.1:9/0")) as client:
        yield (
            ChatRepl(
                client,
                Conversation(),
                tmp_path / "chat.md",
                err=Console(file=err, width=300, highlight=False),
            ),
            err,
        )


def test_a_failed_backend_prints_one_line_and_the_question_stays_out_of_the_context(
    repl: tuple[ChatRepl, io.StringIO],
) -> None:
    chat, err = repl
    failed = Answer("failed", "", "gpu1", None, reason="backend 'ollama' on node 'gpu1' refused")
    chat._record("hello", failed, 1, JOB)
    assert err.getvalue() == f"✗ backend 'ollama' on node 'gpu1' refused (job {JOB} on gpu1)\n"
    assert chat.conversation.context() == ()
    assert "*(failed: backend 'ollama' on node 'gpu1' refused)*" in chat.conversation.transcript()


def test_a_routing_error_prints_its_message_alone(repl: tuple[ChatRepl, io.StringIO]) -> None:
    chat, err = repl
    message = str(UnknownNode("no node named 'pi9' (known nodes: alpha)"))
    chat._record("hi", Answer("failed", "", None, None, reason=message), 1, JOB)
    assert err.getvalue() == "✗ no node named 'pi9' (known nodes: alpha)\n"


def test_a_done_answer_joins_the_context_labelled_and_prints_the_summary(
    repl: tuple[ChatRepl, io.StringIO],
) -> None:
    chat, err = repl
    answer, _, _ = play([started("beta"), delta("Hi", 1), done("Hi", 2)])
    assert answer is not None
    chat._record("hello", answer, 3, JOB)
    assert "beta · sim-small · first token" in err.getvalue()
    assert "2 tokens · prompt 9 tokens · 3 messages sent" in err.getvalue()
    assert chat.conversation.turns[-1].label == "beta · sim-small"
    assert [m.content for m in chat.conversation.context()] == ["hello", "Hi"]


def test_chat_without_a_terminal_says_to_use_ask() -> None:
    result = CliRunner().invoke(cli, ["--broker", "redis://127.0.0.1:9/0", "chat"], input="hello\n")
    assert result.exit_code == 2
    assert "corral chat needs a terminal; for scripts use `corral ask`" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("reason", "note"),
    [
        ("job cancelled", "the node stopped generating"),
        ("job cancelled before it started", "it had not started yet"),
        (
            "cancel sent; the node had not confirmed it yet",
            "cancel sent; the node had not confirmed it yet",
        ),
    ],
)
def test_a_cancelled_answer_says_what_the_node_did(
    repl: tuple[ChatRepl, io.StringIO], reason: str, note: str
) -> None:
    chat, err = repl
    chat._record("story", Answer("cancelled", "Once upon", "alpha", None, reason=reason), 1, JOB)
    assert err.getvalue() == f"✂ cancelled job {JOB} on alpha after 2 words: {note}\n"
    assert [m.content for m in chat.conversation.context()] == ["story", "Once upon"]
