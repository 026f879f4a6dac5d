"""Embed jobs on the client side: the spec from a batch of texts, the result from its events.

Both clients (``CorralClient.embed``, ``AsyncCorralClient.embed``) and every front door build
and read embed jobs here. An embed job is routed, leased, moved on failure and cancelled like
a chat; it streams no tokens, and its vectors arrive whole in the done event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from pydantic import ValidationError

from broker.errors import ConfigError, CorralError, JobError, error_from_code
from broker.schemas import (
    AnyStreamEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    JobResult,
    JobSpec,
    Priority,
    describe_validation_error,
)


def make_embed_spec(
    inputs: Sequence[str],
    *,
    model: str | None = None,
    node: str | None = None,
    route: str | None = None,
    tags: frozenset[str] = frozenset(),
    priority: Priority = "interactive",
) -> JobSpec:
    """One job for the whole batch, as the caller sent it (one vector per input, in order).

    ``ConfigError`` names what is wrong (no inputs, a bad model name) without the texts.
    """
    if isinstance(inputs, str):
        raise ConfigError("inputs must be a list of texts, not one string")
    try:
        return JobSpec(
            job_id=uuid.uuid4().hex,
            kind="embed",
            inputs=tuple(inputs),
            node=node,
            route=route,
            model=model,
            tags=tags,
            priority=priority,
            created_at=time.time(),
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid embed job: {describe_validation_error(exc)}") from None


def failure_of(event: AnyStreamEvent) -> CorralError | None:
    """The error a job's final event reports, if it ended badly."""
    if isinstance(event, ErrorEvent) and event.final:
        return error_from_code(event.code, event.message)
    if isinstance(event, InterruptedEvent) and event.final:
        return error_from_code(event.code, event.message)
    if isinstance(event, DoneEvent) and event.result.status != "ok":
        result = event.result
        code = result.error_code or result.status
        return error_from_code(code, result.error_message or f"the job ended: {result.status}")
    return None


class EmbedOutcome:
    """Reads an embed job's events; ``result()`` once they are all read."""

    def __init__(self, job_id: str) -> None:
        self._job_id = job_id
        self._result: JobResult | None = None
        self._failure: CorralError | None = None

    def see(self, event: AnyStreamEvent) -> None:
        failure = failure_of(event)
        if failure is not None:
            self._failure = failure
        elif isinstance(event, DoneEvent):
            self._result = event.result

    def result(self) -> JobResult:
        """The vectors and usage; the job's own error if it failed."""
        if self._failure is not None:
            raise self._failure
        if self._result is None:
            raise JobError(f"embed job {self._job_id} ended without a result")
        return self._result
