"""OpenAI's legacy ``/v1/completions``: a prompt in, text out (streamed or whole), over the
same job path as chat (the prompt becomes one user message)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.errors import JobError
from broker.schemas import ChatMessage, DeltaEvent, DoneEvent, StartedEvent
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.frames import sse
from controller.gateway.jobs import HeldJob, build_spec, hints_from
from controller.gateway.openai_api import (
    API,
    FINISH_REASONS,
    corral_headers,
    error_body,
    failure_of,
    generation_options,
    refuse_unsupported,
    usage_of,
)
from controller.gateway.service import Gateway


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string (one prompt per request)")
    if body.get("suffix") or body.get("echo") or body.get("best_of", 1) not in (1, None):
        raise bad_request("suffix (fill-in-the-middle), echo and best_of are not supported yet")
    return prompt


async def completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model, an alias, model@node or @node")
    refuse_unsupported(body)
    messages = [ChatMessage(role="user", content=_prompt(body))]
    spec = build_spec(
        messages,
        hints_from(model, request.headers),
        generation_options(body),
        gateway.settings.max_prompt_bytes,
    )
    job = await gateway.hold(request, API, spec)
    created = int(time.time())
    if body.get("stream"):
        frames = _stream(job, created)
        return gateway.stream(API, job, frames, "text/event-stream", corral_headers(job))
    answer = await gateway.collect(request, API, job, lambda: _whole(job, created))
    return JSONResponse(answer, headers=corral_headers(job))


def _object(job: HeldJob, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": f"cmpl-{job.job_id}",
        "object": "text_completion",
        "created": created,
        "model": job.model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


def _finish(done: DoneEvent) -> str:
    return FINISH_REASONS.get(done.result.finish_reason or "stop", "stop")


async def _stream(job: HeldJob, created: int) -> AsyncIterator[bytes]:
    try:
        async for event in job.all_events():
            if (failure := failure_of(event)) is not None:
                yield sse(error_body(failure))
                await job.drain()  # the library's after-end steps (session, breakers)
                return
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent) and event.text:
                yield sse(_object(job, created, event.text, None))
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                yield sse(_object(job, created, "", _finish(event)))
                yield b"data: [DONE]\n\n"
                await job.drain()
                return
    except JobError as exc:
        yield sse(error_body(http_error(exc)))


async def _whole(job: HeldJob, created: int) -> dict[str, Any]:
    parts: list[str] = []
    try:
        async for event in job.all_events():
            if (failure := failure_of(event)) is not None:
                await job.drain()
                raise failure
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent):
                parts.append(event.text)
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                await job.drain()
                return {
                    **_object(job, created, "".join(parts), _finish(event)),
                    "usage": usage_of(event),
                }
    except JobError as exc:
        raise http_error(exc) from None
    raise HttpError(502, "the job ended without an answer", "server_error")


def routes() -> list[Route]:
    return [Route(f"{p}/completions", completions, methods=["POST"]) for p in ("/v1", "")]
