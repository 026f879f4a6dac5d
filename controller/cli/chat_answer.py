"""One answer in ``corral chat``: submit, print tokens as they come, stop on Ctrl-C.

The job is followed on a thread of its own while the REPL's thread only waits on a queue, so
a Ctrl-C (a KeyboardInterrupt in the main thread) never lands inside a Redis read: the main
thread sends the cancel, and the follower reads the job to its end, which is the worker's
``cancelled`` once it has closed its backend stream.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal, TextIO

import redis.exceptions
from rich.console import Console
from rich.markup import escape

from broker.errors import BrokerUnavailable, CorralError, JobError
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    JobSpec,
    ReroutedEvent,
    StartedEvent,
    is_terminal,
)
from controller.client import CorralClient
from controller.router import Candidate

CANCEL_WAIT_S = 10.0
"""How long to wait, after a Ctrl-C, for the node to confirm it stopped."""

Outcome = Literal["done", "cancelled", "failed"]


@dataclass
class Answer:
    """How one prompt ended, for the conversation and the summary line."""

    outcome: Outcome
    text: str
    node: str | None
    model: str | None
    first_token_ms: float | None = None
    result: JobResult | None = None
    reason: str = ""
    """Why it did not complete (a cancel, the error's message)."""


class _Ended:
    """The follower's last word: the events are over (or raised ``error``)."""

    def __init__(self, error: CorralError | None = None) -> None:
        self.error = error


def _follow(
    client: CorralClient, spec: JobSpec, timeout_s: float, inbox: queue.Queue[object]
) -> None:
    """Submit ``spec`` and put each event on ``inbox``, then an ``_Ended`` in every case, so
    the REPL never waits on a follower that has gone."""
    ended = _Ended(JobError("following the job stopped unexpectedly (see the error above)"))
    try:
        run = client.submit(spec)
        inbox.put(run.candidate)
        for event in run.events(timeout_s):
            inbox.put(event)
        ended = _Ended()
    except CorralError as exc:
        ended = _Ended(exc)
    except redis.exceptions.RedisError as exc:
        ended = _Ended(BrokerUnavailable(f"Redis failed while following the job: {exc}"))
    finally:
        inbox.put(ended)


class AnswerPrinter:
    """Prints one job's answer and builds its ``Answer``."""

    def __init__(self, out: TextIO, err: Console) -> None:
        self.out = out
        self.err = err
        self.parts: list[str] = []
        self.node: str | None = None
        self.model: str | None = None
        self.first_token_ms: float | None = None
        self.sent_at = time.perf_counter()
        self.quiet = False
        """After a cancel, later tokens are not printed."""

    def note(self, markup: str) -> None:
        self._end_line()
        self.err.print(markup)

    def _end_line(self) -> None:
        if self.parts and not "".join(self.parts).endswith("\n"):
            self.out.write("\n")
        self.out.flush()

    def take(self, event: AnyStreamEvent) -> Answer | None:
        """Show ``event``; the Answer once the job has ended."""
        if isinstance(event, StartedEvent):
            self.node, self.model = event.node, event.model
        elif isinstance(event, DeltaEvent):
            if self.first_token_ms is None:
                self.first_token_ms = (time.perf_counter() - self.sent_at) * 1000
            if not self.quiet:
                self.out.write(event.text)
                self.out.flush()
            self.parts.append(event.text)
        elif isinstance(event, ReroutedEvent):
            self.note(
                f"[yellow]↻ moved to {escape(event.to_node)} (attempt {event.attempt}): "
                f"{escape(event.reason)}[/yellow]"
            )
            self.parts = []  # a restarted answer starts over
        elif isinstance(event, ErrorEvent | InterruptedEvent) and not event.final:
            self.note(f"[yellow]✗ {escape(event.node or '?')}: {escape(event.message)}[/yellow]")
        if not is_terminal(event):
            return None
        self._end_line()
        if isinstance(event, DoneEvent):
            result = event.result
            return Answer(
                "done", result.text, result.node, result.model, self.first_token_ms, result
            )
        code, message = (
            (event.code, event.message)
            if isinstance(event, ErrorEvent | InterruptedEvent)
            else ("failed", "the job ended without an answer")
        )
        outcome: Outcome = "cancelled" if code == "cancelled" else "failed"
        node = getattr(event, "node", None) or self.node
        return Answer(
            outcome, "".join(self.parts), node, self.model, self.first_token_ms, reason=message
        )

    def failed(self, error: CorralError) -> Answer:
        self._end_line()
        return Answer("failed", "".join(self.parts), self.node, self.model, reason=str(error))


def stream_answer(
    client: CorralClient, spec: JobSpec, *, out: TextIO, err: Console, timeout_s: float
) -> Answer:
    """Run ``spec``, printing its tokens to ``out`` and notes to ``err``; Ctrl-C cancels it
    (in the cluster) and returns a ``cancelled`` Answer once the node has stopped."""
    inbox: queue.Queue[object] = queue.Queue()
    printer = AnswerPrinter(out, err)
    follower = threading.Thread(
        target=_follow, args=(client, spec, timeout_s, inbox), name="chat-follow", daemon=True
    )
    follower.start()
    try:
        finished = _drain(inbox, printer, deadline=None)
    except KeyboardInterrupt:
        finished = None
    if finished is not None:
        return finished
    printer.quiet = True
    try:
        client.cancel(spec.job_id)
    except CorralError as exc:
        printer.note(f"[red]could not send the cancel: {escape(str(exc))}[/red]")
        return Answer("cancelled", "".join(printer.parts), printer.node, printer.model)
    try:
        answer = _drain(inbox, printer, deadline=time.monotonic() + CANCEL_WAIT_S)
    except KeyboardInterrupt:
        answer = None  # a second Ctrl-C: stop waiting for the node's word
    if answer is not None and answer.outcome == "done":
        printer.note(
            "[dim]the answer had finished before the cancel reached its node: "
            "/history and the transcript hold all of it[/dim]"
        )
    if answer is None:
        return Answer(
            "cancelled",
            "".join(printer.parts),
            printer.node,
            printer.model,
            printer.first_token_ms,
            reason="cancel sent; the node had not confirmed it yet",
        )
    return answer


def _drain(
    inbox: queue.Queue[object], printer: AnswerPrinter, deadline: float | None
) -> Answer | None:
    """Take the follower's items until the job ends (or ``deadline`` passes: None)."""
    while True:
        wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if wait <= 0:
            return None
        try:
            item = inbox.get(timeout=wait)
        except queue.Empty:
            continue
        if isinstance(item, _Ended):
            if item.error is not None:
                return printer.failed(item.error)
            return printer.failed(JobError("the job's stream ended without an outcome"))
        if isinstance(item, AnyStreamEvent):
            answer = printer.take(item)
            if answer is not None:
                return answer
        elif isinstance(item, Candidate):  # where the job was first sent
            printer.node, printer.model = item.node, item.model
