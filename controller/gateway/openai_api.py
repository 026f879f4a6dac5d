"""The OpenAI-compatible API: ``/v1/chat/completions`` (streamed or not), ``/v1/models`` and
``/v1/embeddings`` (in ``controller.gateway.embeddings``).

Every route also answers without the ``/v1`` prefix, so a base URL given with or without it
works. The answer's ``model`` is the model that really served the job.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.errors import JobError
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    GenerationOptions,
    StartedEvent,
)
from controller.gateway.catalog import CatalogEntry, catalog, find
from controller.gateway.embeddings import openai_embeddings
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.jobs import HeldJob, build_spec, final_failure, hints_from
from controller.gateway.requests import optional, options_from
from controller.gateway.service import Gateway

API = "openai"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


def error_body(exc: HttpError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}}


def _text_of(content: object, index: int) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text is taken."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"messages[{index}]: content parts of type {kind!r} are not supported yet"
                    " (text only)"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of parts")


def messages_from(body: dict[str, Any]) -> list[ChatMessage]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object")
        role = _ROLES.get(str(message.get("role")))
        if role is None:
            raise bad_request(
                f"messages[{index}].role {message.get('role')!r} is not supported"
                " (system, developer, user, assistant)"
            )
        text = _text_of(message.get("content"), index)
        messages.append(ChatMessage(role=role, content=text))
    return messages


def refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("tools") or body.get("functions"):
        raise bad_request(
            "tools are not supported by the corral gateway yet: no backend passes them through",
            "tools_not_supported",
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
    return options_from(
        temperature=optional(body, "temperature", float),
        max_tokens=max_tokens,
        seed=optional(body, "seed", int),
        stop=stop,
    )


def _completion_id(job: HeldJob) -> str:
    return f"chatcmpl-{job.job_id}"


def corral_headers(job: HeldJob) -> dict[str, str]:
    return {"X-Corral-Node": job.node, "X-Corral-Job": job.job_id}


def usage_of(done: DoneEvent) -> dict[str, int]:
    usage = done.result.usage
    prompt = usage.prompt_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt + usage.completion_tokens,
    }


def sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model, an alias, model@node or @node")
    refuse_unsupported(body)
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options") or {}
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    spec = build_spec(
        messages_from(body),
        hints_from(model, request.headers),
        generation_options(body),
        gateway.settings.max_prompt_bytes,
    )
    job = await gateway.hold(request, API, spec)
    created = int(time.time())
    if stream:
        frames = _stream_frames(job, created, include_usage)
        return gateway.stream(API, job, frames, "text/event-stream", corral_headers(job))
    answer = await gateway.collect(request, API, job, lambda: _whole(job, created))
    return JSONResponse(answer, headers=corral_headers(job))


async def _stream_frames(job: HeldJob, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": _completion_id(job),
            "object": "chat.completion.chunk",
            "created": created,
            "model": job.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    first = True
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
            elif isinstance(event, DeltaEvent) and event.text:
                delta = (
                    {"role": "assistant", "content": event.text}
                    if first
                    else {"content": event.text}
                )
                first = False
                yield sse(chunk(delta, None))
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                if first:
                    yield sse(chunk({"role": "assistant", "content": ""}, None))
                reason = FINISH_REASONS.get(event.result.finish_reason or "stop", "stop")
                yield sse(chunk({}, reason))
                if include_usage:
                    usage_chunk = chunk({}, None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = usage_of(event)
                    yield sse(usage_chunk)
                yield b"data: [DONE]\n\n"
                await job.drain()  # the library's after-end steps (session, breakers)
                return
    except JobError as exc:
        yield sse(error_body(http_error(exc)))


def failure_of(event: AnyStreamEvent) -> HttpError | None:
    failure = final_failure(event)
    return None if failure is None else http_error(failure)


async def _whole(job: HeldJob, created: int) -> dict[str, Any]:
    parts: list[str] = []
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
            elif isinstance(event, DoneEvent):
                done = event
                job.record_done(event)
                await job.drain()  # the library's after-end steps (session, breakers)
                break
    except JobError as exc:
        raise http_error(exc) from None
    if done is None:
        raise HttpError(502, "the job ended without an answer", "server_error")
    return {
        "id": _completion_id(job),
        "object": "chat.completion",
        "created": created,
        "model": job.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
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
