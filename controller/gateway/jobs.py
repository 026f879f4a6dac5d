"""One request's job: routing hints in, a spec, and its stream held until the first token.

A job whose node fails before its first token is moved by the library (``AsyncJobRun``); the
gateway holds the HTTP status line until the first real token (or the job's end) so such a job
becomes another node's answer or a proper HTTP error, never a 200 with an empty answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from broker.errors import CorralError, JobError, RoutingError, error_from_code
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    InterruptedEvent,
    JobSpec,
    Priority,
    StartedEvent,
    ToolDefinition,
    describe_validation_error,
)
from controller.aclient import AsyncCorralClient
from controller.ajobrun import AsyncJobRun
from controller.client import new_job_id
from controller.dispatch import preferred_candidates
from controller.embedding import failure_of
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.limits import check_prompt_size
from controller.prompt import parse_tags

_T = TypeVar("_T")

PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


@dataclass(frozen=True)
class Hints:
    """Where a request may run: from its ``model`` field and the ``X-Corral-*`` headers."""

    model: str | None
    node: str | None = None
    tags: frozenset[str] = frozenset()
    priority: Priority = "interactive"
    session: str | None = None


def split_model(model: str | None) -> tuple[str | None, str | None]:
    """``"llama3@gpu1"`` -> ``("llama3", "gpu1")``; ``"@gpu1"`` -> ``(None, "gpu1")``."""
    if not model:
        return None, None
    name, at, node = model.partition("@")
    if not at:
        return model, None
    if not node:
        raise bad_request(f"model {model!r} ends with '@': name a node after it", "invalid_model")
    return name or None, node


def hints_from(model: str | None, headers: Mapping[str, str]) -> Hints:
    name, node = split_model(model)
    header_node = headers.get("x-corral-node") or None
    if header_node and node and header_node != node:
        raise bad_request(f"the model names node {node!r} but X-Corral-Node says {header_node!r}")
    priority = headers.get("x-corral-priority", "interactive")
    if priority not in PRIORITIES:
        raise bad_request(f"X-Corral-Priority must be one of {', '.join(PRIORITIES)}")
    return Hints(
        model=name,
        node=node or header_node,
        tags=parse_tags((headers.get("x-corral-tags", ""),)),
        priority=priority,  # checked against PRIORITIES above
        session=headers.get("x-corral-session") or None,
    )


def build_spec(
    messages: list[ChatMessage],
    hints: Hints,
    options: GenerationOptions,
    max_prompt_bytes: int,
    *,
    tools: tuple[ToolDefinition, ...] = (),
) -> JobSpec:
    """The job; ``HttpError`` 400 for a bad hint, 413 for a prompt over the cluster's limit.

    A job with tools or images asks the router for the ``tools`` / ``vision`` capability (as
    tags, which a model's capabilities meet), so it goes only to a model that has it."""
    if not messages:
        raise bad_request("messages must hold at least one message")
    try:
        # Built and validated once, from the request's own messages (no placeholder spec).
        spec = JobSpec(
            job_id=new_job_id(),
            messages=tuple(messages),
            node=hints.node,
            model=hints.model,
            tags=hints.tags,
            priority=hints.priority,
            session=hints.session,
            options=options,
            created_at=time.time(),
            tools=tools,
        )
        if spec.needs():
            spec = spec.model_copy(update={"tags": spec.tags | spec.needs()})
        check_prompt_size(spec, max_prompt_bytes)
    except ValidationError as exc:
        raise bad_request(f"invalid request: {describe_validation_error(exc)}") from None
    except CorralError as exc:
        raise http_error(exc) from None
    return spec


def capability_refusal(spec: JobSpec) -> HttpError:
    """A 400 for a job no model can take because it needs tools or vision."""
    needs = " and ".join(sorted(spec.needs()))
    model = f"model {spec.model!r}" if spec.model else "model"
    return bad_request(
        f"no up node serves {model} with the {needs} capability this request needs",
        "capability_missing",
    )


async def only_capability_missing(client: AsyncCorralClient, spec: JobSpec) -> bool:
    """Whether ``spec`` could be routed but for the capabilities its tools or images need
    (then the request is at fault: 400), rather than for a model or node that is missing or
    down (404, 503 as usual)."""
    plain = spec.model_copy(update={"tags": spec.tags - spec.needs()})
    try:
        view = await client.cluster(max_age_s=client.settings.route_cache_s)
        phases = client.breaker_phases(view)
        preferred_candidates(plain, view, phases, aliases=client.settings.aliases)
    except CorralError:
        return False
    return True


@dataclass
class HeldJob:
    """A job whose first token (or end) has arrived: the status line can now be sent."""

    run: AsyncJobRun
    held: list[AnyStreamEvent]
    rest: AsyncIterator[AnyStreamEvent]
    node: str
    model: str
    submitted_at: float
    first_token_at: float | None = None
    finished: bool = False
    outcome: str = "error"
    """How it ended for the metrics: ok, error, cancelled (the client left)."""
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    tier: str | None = None
    """The cost tier serving it (local, subscription, metered), from its started event."""

    def record_done(self, event: DoneEvent) -> None:
        self.outcome = "ok" if event.result.status == "ok" else event.result.status
        self.prompt_tokens = event.result.usage.prompt_tokens
        self.completion_tokens = event.result.usage.completion_tokens

    @property
    def job_id(self) -> str:
        return self.run.job_id

    def headers(self) -> dict[str, str]:
        """corral's response headers: who served the job, and from which tier."""
        headers = {"X-Corral-Node": self.node, "X-Corral-Job": self.job_id}
        if self.tier:
            headers["X-Corral-Tier"] = self.tier
        return headers

    async def all_events(self) -> AsyncIterator[AnyStreamEvent]:
        """The held events, then the rest as they come; raises JobError from the library."""
        for event in self.held:
            yield event
        async for event in self.rest:
            yield event

    async def drain(self) -> None:
        await drain(self.rest)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.rest.aclose()  # type: ignore[attr-defined]
        await self.run.aclose()


async def drain(events: AsyncIterator[AnyStreamEvent]) -> None:
    """Iterate to the end: the job run performs what follows its last event (saving the
    session, resetting or tripping breakers) only as it is iterated past it."""
    with contextlib.suppress(JobError):
        async for _event in events:
            pass


def final_failure(event: AnyStreamEvent) -> CorralError | None:
    """The job's failure; an interruption ends an HTTP answer even when the job moves on (the
    text already sent cannot be taken back)."""
    if isinstance(event, ErrorEvent) and event.final:
        return error_from_code(event.code, event.message, event.retry_after)
    if isinstance(event, InterruptedEvent):
        return error_from_code(event.code, event.message)
    return failure_of(event)


async def submit_and_hold(client: AsyncCorralClient, spec: JobSpec, timeout_s: float) -> HeldJob:
    """Submit ``spec`` and read its events up to the first token or its end.

    Raises ``HttpError`` when the job cannot start or fails before its first token (after the
    library has tried the other nodes it may move to).
    """
    submitted_at = time.monotonic()
    try:
        run = await client.submit(spec)
    except RoutingError as exc:
        if spec.needs() and await only_capability_missing(client, spec):
            raise capability_refusal(spec) from None
        raise http_error(exc) from None
    except CorralError as exc:
        raise http_error(exc) from None
    events = run.events(timeout_s).__aiter__()
    held: list[AnyStreamEvent] = []
    node, model, tier = run.candidate.node, run.candidate.model, run.candidate.tier
    try:
        while True:
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                raise HttpError(502, "the job ended without an answer", "server_error") from None
            held.append(event)
            if isinstance(event, StartedEvent):
                node, model, tier = event.node, event.model, event.tier or tier
            failure = final_failure(event)
            if failure is not None:
                await drain(events)
                raise http_error(failure)
            if isinstance(event, DeltaEvent) and event.has_output():
                job = HeldJob(
                    run, held, events, node, model, submitted_at, time.monotonic(), tier=tier
                )
                return job
            if isinstance(event, DoneEvent):
                return HeldJob(
                    run, held, events, node, model, submitted_at, None, finished=True, tier=tier
                )
    except JobError as exc:
        await events.aclose()  # type: ignore[attr-defined]
        raise http_error(exc) from None
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise


async def wait_for_disconnect(receive: Callable[[], Awaitable[Mapping[str, object]]]) -> None:
    """Returns when the client has gone away (its request body was read already)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def unless_disconnected(
    work: Awaitable[_T],
    receive: Callable[[], Awaitable[Mapping[str, object]]],
    on_disconnect: Callable[[], Awaitable[None]],
) -> _T:
    """``work``'s result; if the client leaves first, ``work`` is cancelled, ``on_disconnect``
    awaited and ``ClientGone`` raised. The same happens when the request itself is cancelled
    (the server shutting down), which is then re-raised.

    ``work`` runs in the request's own task, which a watcher task cancels when the client
    leaves (as ``asyncio.timeout`` does): no task of its own to schedule, so it starts at once
    and a frame it sends leaves in the same turn of the loop."""
    task = asyncio.current_task()
    assert task is not None, "called outside a task"
    client_left = False

    async def watch() -> None:
        nonlocal client_left
        await wait_for_disconnect(receive)
        client_left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except BaseException as exc:
        # The work's own failure goes on as it is; a cancellation (or whatever the work's
        # clean-up turned it into, once the client left) abandons the work.
        if not client_left and not isinstance(exc, asyncio.CancelledError):
            raise
        # Shielded: it must reach Redis even when this request is being cancelled.
        await asyncio.shield(on_disconnect())
        if client_left and task.uncancel() == 0:
            raise ClientGone from None
        raise  # the server's cancellation (too): it goes on
    finally:
        watcher.cancel()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; nobody is left to tell."""
