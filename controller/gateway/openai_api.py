"""The OpenAI-compatible API: ``/v1/chat/completions`` (streamed or not), ``/v1/models`` and
``/v1/embeddings`` (in ``controller.gateway.embeddings``).

Every route also answers without the ``/v1`` prefix, so a base URL given with or without it
works. The answer's ``model`` is the model that really served the job.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.errors import JobError
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    GenerationOptions,
    StartedEvent,
    ToolCall,
)
from controller.gateway.catalog import CatalogEntry, catalog, find
from controller.gateway.embeddings import openai_embeddings
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.frames import ChunkFrames, sse
from controller.gateway.jobs import HeldJob, build_spec, final_failure, hints_from
from controller.gateway.openai_messages import messages_from
from controller.gateway.requests import optional, options_from
from controller.gateway.service import Gateway
from controller.gateway.tool_wire import (
    openai_tool_call_deltas,
    openai_tool_calls,
    tools_from,
)

API = "openai"
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
}


def error_body(exc: HttpError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}}


def refuse_unsupported(body: dict[str, Any], *, tools_allowed: bool = False) -> None:
    if body.get("functions"):
        raise bad_request(
            "'functions' (the deprecated form) is not supported: send 'tools'",
            "tools_not_supported",
        )
    if body.get("tools") and not tools_allowed:
        raise bad_request("tools are not supported on this endpoint", "tools_not_supported")
    if body.get("tool_choice") not in (None, "auto"):
        raise bad_request(
            "tool_choice other than 'auto' is not supported by the corral gateway yet",
            "tool_choice_not_supported",
        )
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise bad_request(
            "response_format other than text (JSON mode, JSON schema) is not supported by the"
            " corral gateway yet",
            "response_format_not_supported",
        )
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad_request("only n=1 is supported")


def generation_options(body: dict[str, Any]) -> GenerationOptions:
    max_tokens = optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = optional(body, "max_tokens", int)
    stop = body.get("stop")
    effort = optional(body, "reasoning_effort", str)
    return options_from(
        temperature=optional(body, "temperature", float),
        max_tokens=max_tokens,
        seed=optional(body, "seed", int),
        stop=stop,
        # The effort maps onto each family's own control (a model without one ignores it);
        # any effort also asks an Ollama thinking model to think, "none" asks it not to.
        effort=None if effort == "none" else effort,
        think=None if effort is None else effort != "none",
    )


def _completion_id(job: HeldJob) -> str:
    return f"chatcmpl-{job.job_id}"


def corral_headers(job: HeldJob) -> dict[str, str]:
    return job.headers()


def usage_of(done: DoneEvent) -> dict[str, int]:
    usage = done.result.usage
    prompt = usage.prompt_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt + usage.completion_tokens,
    }


async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model, an alias, model@node or @node")
    refuse_unsupported(body, tools_allowed=True)
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options") or {}
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    spec = build_spec(
        await messages_from(body, gateway.images),
        hints_from(model, request.headers),
        generation_options(body),
        gateway.settings.max_prompt_bytes,
        tools=tools_from(body),
    )
    job = await gateway.hold(request, API, spec)
    created = int(time.time())
    if stream:
        frames = _stream_frames(job, created, include_usage)
        return gateway.stream(API, job, frames, "text/event-stream", corral_headers(job))
    answer = await gateway.collect(request, API, job, lambda: _whole(job, created))
    return JSONResponse(answer, headers=corral_headers(job))


async def _stream_frames(job: HeldJob, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    frames = ChunkFrames(_completion_id(job), created)
    first = True
    calls_sent = 0
    try:
        async for event in job.all_events():
            if (failure := failure_of(event)) is not None:
                # After the first token the status line is sent: the error goes in the stream,
                # where the openai client raises it.
                yield sse(error_body(failure))
                await job.drain()  # the library's after-end steps (session, breakers)
                return
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent) and event.has_output():
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                first = False
                if event.reasoning:
                    delta["reasoning_content"] = event.reasoning
                if event.text:
                    delta["content"] = event.text
                if event.tool_calls:
                    delta["tool_calls"] = openai_tool_call_deltas(event.tool_calls, calls_sent)
                    calls_sent += len(event.tool_calls)
                yield frames.frame(job.model, delta, None)
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                if first:
                    yield frames.frame(job.model, {"role": "assistant", "content": ""}, None)
                reason = FINISH_REASONS.get(event.result.finish_reason or "stop", "stop")
                # The last frames leave together: one write, one wake-up of the client.
                last = [frames.frame(job.model, {}, reason)]
                if include_usage:
                    usage_chunk = frames.chunk(job.model, {}, None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = usage_of(event)
                    last.append(sse(usage_chunk))
                yield b"".join((*last, b"data: [DONE]\n\n"))
                await job.drain()  # the library's after-end steps (session, breakers)
                return
    except JobError as exc:
        yield sse(error_body(http_error(exc)))


def failure_of(event: AnyStreamEvent) -> HttpError | None:
    failure = final_failure(event)
    return None if failure is None else http_error(failure)


async def _whole(job: HeldJob, created: int) -> dict[str, Any]:
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    done: DoneEvent | None = None
    try:
        async for event in job.all_events():
            if (failure := failure_of(event)) is not None:
                await job.drain()  # the library's after-end steps (session, breakers)
                raise failure
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent):
                parts.append(event.text)
                reasoning.append(event.reasoning)
                calls.extend(event.tool_calls)
            elif isinstance(event, DoneEvent):
                done = event
                job.record_done(event)
                await job.drain()  # the library's after-end steps (session, breakers)
                break
    except JobError as exc:
        raise http_error(exc) from None
    if done is None:
        raise HttpError(502, "the job ended without an answer", "server_error")
    text = "".join(parts)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = openai_tool_calls(tuple(calls))
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return {
        "id": _completion_id(job),
        "object": "chat.completion",
        "created": created,
        "model": job.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(done.result.finish_reason or "stop", "stop"),
            }
        ],
        "usage": usage_of(done),
    }


def _model_object(entry: CatalogEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": 0,
        "owned_by": "corral",
        "corral": {"nodes": entry.nodes, "loaded_on": entry.loaded_on, "alias_of": entry.alias_of},
    }


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    data = [_model_object(entry) for entry in await catalog(gateway)]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    name = request.path_params["model"]
    entry = find(await catalog(gateway), name)
    if entry is None:
        raise HttpError(
            404, f"the model {name!r} does not exist on any up node", code="model_not_found"
        )
    return JSONResponse(_model_object(entry))


def routes() -> list[Route]:

    found = []
    for prefix in ("/v1", ""):
        found += [
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/models", list_models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", retrieve_model, methods=["GET"]),
            Route(f"{prefix}/embeddings", openai_embeddings, methods=["POST"]),
        ]
    return found
