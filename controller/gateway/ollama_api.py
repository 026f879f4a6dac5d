"""The Ollama-compatible API: ``/api/chat``, ``/api/generate`` (NDJSON), ``/api/tags``,
``/api/ps``, ``/api/show``, ``/api/version``; ``name`` and ``name:latest`` are one model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
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
    ModelInfo,
    ModelOpKind,
    StartedEvent,
    ToolCall,
)
from controller.gateway.catalog import CatalogEntry, catalog, find
from controller.gateway.embeddings import ollama_embed, ollama_embeddings
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.frames import ndjson
from controller.gateway.jobs import HeldJob, build_spec, final_failure, hints_from, split_model
from controller.gateway.requests import optional, options_from
from controller.gateway.service import Gateway
from controller.gateway.tool_wire import (
    chat_message,
    link_tool_results,
    ollama_tool_calls,
    parse_ollama_tool_calls,
    tools_from,
)

API = "ollama"
NDJSON = "application/x-ndjson"
_ROLES = ("system", "user", "assistant", "tool")
_OLLAMA_CAPABILITY = {"chat": "completion", "embed": "embedding"}
"""corral's capability names in Ollama's /api/show vocabulary."""


def error_body(exc: HttpError) -> dict[str, Any]:
    return {"error": exc.message}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _options(body: dict[str, Any]) -> GenerationOptions:
    raw = body.get("options") or {}
    if not isinstance(raw, dict):
        raise bad_request("'options' must be an object")
    think = body.get("think")
    if think is not None and not isinstance(think, bool | str):
        raise bad_request("'think' must be true, false or a level (low, medium, high)")
    return options_from(
        temperature=optional(raw, "temperature", float),
        max_tokens=optional(raw, "num_predict", int),
        seed=optional(raw, "seed", int),
        stop=raw.get("stop"),
        # A level ("high") is passed as plain thinking: corral has no levels yet.
        think=None if think is None else bool(think),
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("format"):
        raise bad_request("'format' (structured output) is not supported by the corral gateway yet")


def _chat_messages(body: dict[str, Any]) -> list[ChatMessage]:
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise bad_request("'messages' must be a list")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise bad_request(f"messages[{index}] needs a role of {', '.join(_ROLES)}")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{index}].content must be a string")
        fields: dict[str, Any] = {
            "role": message["role"],
            "content": content,
            "images": _images(message.get("images"), f"messages[{index}].images"),
            "tool_calls": parse_ollama_tool_calls(index, message.get("tool_calls")),
        }
        if message["role"] == "tool":
            fields["name"] = message.get("tool_name") or message.get("name") or None
            fields["tool_call_id"] = message.get("tool_call_id") or None
        messages.append(chat_message(index, **fields))
    return link_tool_results(messages)


def _images(raw: object, where: str) -> list[str]:
    """Ollama's images: base64 strings (its clients encode files and bytes before sending)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise bad_request(f"{where} must be a list of base64 strings")
    for image in raw:
        if image.startswith(("http://", "https://", "data:")):
            raise bad_request(f"{where}: Ollama's API takes base64 image data, not URLs")
    return raw


def _generate_messages(body: dict[str, Any]) -> list[ChatMessage]:
    prompt = body.get("prompt") or ""
    system = body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise bad_request("'prompt' and 'system' must be strings")
    if not prompt:
        return []
    messages = [ChatMessage(role="system", content=system)] if system else []
    images = _images(body.get("images"), "images")
    return [*messages, chat_message(0, role="user", content=prompt, images=images)]


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required")
    return model


async def chat(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    return await _answer(request, gateway, body, _chat_messages(body), chat=True)


async def generate(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    return await _answer(request, gateway, body, _generate_messages(body), chat=False)


async def _answer(
    request: Request,
    gateway: Gateway,
    body: dict[str, Any],
    messages: list[ChatMessage],
    *,
    chat: bool,
) -> Response:
    model = _model_of(body)
    _refuse_unsupported(body)
    if not messages:
        # Ollama's load / unload request: a model and no prompt.
        return await _load_or_unload(gateway, model, body.get("keep_alive"), chat=chat)
    spec = build_spec(
        messages,
        hints_from(model, request.headers),
        _options(body),
        gateway.settings.max_prompt_bytes,
        tools=tools_from(body) if chat else (),
    )
    job = await gateway.hold(request, API, spec)
    headers = job.headers()
    if body.get("stream", True):
        frames = _stream_lines(job, chat=chat)
        return gateway.stream(API, job, frames, NDJSON, headers)
    whole = await gateway.collect(request, API, job, lambda: _whole(job, chat=chat))
    return JSONResponse(whole, headers=headers)


def _content(
    text: str, *, chat: bool, thinking: str = "", calls: tuple[ToolCall, ...] = ()
) -> dict[str, Any]:
    """The answer's part of a line: in ``message`` for chat, top-level for generate."""
    extra: dict[str, Any] = {"thinking": thinking} if thinking else {}
    if chat:
        if calls:
            extra["tool_calls"] = ollama_tool_calls(calls)
        return {"message": {"role": "assistant", "content": text, **extra}}
    return {"response": text, **extra}


def _final(
    job: HeldJob,
    done: DoneEvent,
    *,
    chat: bool,
    text: str = "",
    thinking: str = "",
    calls: tuple[ToolCall, ...] = (),
) -> dict[str, Any]:
    """The last line: the tool calls (Ollama's clients read them from here), the counters."""
    result = done.result
    # Ollama says "stop" after a tool call; "tool_calls" is OpenAI's word.
    reason = "stop" if result.finish_reason == "tool_calls" else result.finish_reason
    total_ns = int(result.timings.total_ms * 1e6)
    first_ms = result.timings.first_token_ms or 0.0
    prompt_ns = int(first_ms * 1e6)
    return {
        "model": job.model,
        "created_at": _now(),
        **_content(text, chat=chat, thinking=thinking, calls=calls),
        "done": True,
        "done_reason": reason or "stop",
        "total_duration": total_ns,
        "load_duration": int(result.timings.queued_ms * 1e6),
        "prompt_eval_count": result.usage.prompt_tokens or 0,
        "prompt_eval_duration": prompt_ns,
        "eval_count": result.usage.completion_tokens,
        "eval_duration": max(0, total_ns - prompt_ns - int(result.timings.queued_ms * 1e6)),
    }


def _failure(event: AnyStreamEvent) -> HttpError | None:
    failure = final_failure(event)
    return None if failure is None else http_error(failure)


async def _stream_lines(job: HeldJob, *, chat: bool) -> AsyncIterator[bytes]:
    calls: list[ToolCall] = []
    try:
        async for event in job.all_events():
            if (failure := _failure(event)) is not None:
                yield ndjson(error_body(failure))  # Ollama's mid-stream error line
                await job.drain()  # the library's after-end steps (session, breakers)
                return
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent):
                calls.extend(event.tool_calls)
                if event.text or event.reasoning:
                    answer = _content(event.text, chat=chat, thinking=event.reasoning)
                    line = {"model": job.model, "created_at": _now(), **answer, "done": False}
                    yield ndjson(line)
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                yield ndjson(_final(job, event, chat=chat, calls=tuple(calls)))
                await job.drain()  # the library's after-end steps (session, breakers)
                return
    except JobError as exc:
        yield ndjson(error_body(http_error(exc)))


async def _whole(job: HeldJob, *, chat: bool) -> dict[str, Any]:
    parts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    try:
        async for event in job.all_events():
            if (failure := _failure(event)) is not None:
                await job.drain()  # the library's after-end steps (session, breakers)
                raise failure
            if isinstance(event, StartedEvent):
                job.node, job.model = event.node, event.model
            elif isinstance(event, DeltaEvent):
                parts.append(event.text)
                thinking.append(event.reasoning)
                calls.extend(event.tool_calls)
            elif isinstance(event, DoneEvent):
                job.record_done(event)
                return _final(
                    job,
                    event,
                    chat=chat,
                    text="".join(parts),
                    thinking="".join(thinking),
                    calls=tuple(calls),
                )
    except JobError as exc:
        raise http_error(exc) from None
    raise HttpError(502, "the job ended without an answer", "server_error")


async def _load_or_unload(
    gateway: Gateway, model: str, keep_alive: object, *, chat: bool
) -> Response:
    """No prompt: ``keep_alive: 0`` unloads ``model`` from every node holding it, anything else
    warms it on a node that has it loaded already, else the first that has it (as Ollama
    loads it). A node whose backend cannot manage models (llama.cpp) is left as it is."""
    name, node = split_model(model)
    entries = await catalog(gateway)
    entry = find(entries, name) if name else None
    if entry is None or name is None:
        raise HttpError(404, f"model '{model}' not found", code="model_not_found")
    real = entry.alias_of[0] if entry.alias_of else entry.name
    unload = keep_alive in (0, "0", "0s", "0m")
    if unload:
        for target in entry.loaded_on:
            if node is None or target == node:
                await _model_op_if_supported(gateway, target, "unload", real, None)
    else:
        targets = [node] if node else (entry.loaded_on[:1] or entry.nodes[:1])
        alive = None if keep_alive is None else str(keep_alive)
        for target in targets:
            await _model_op_if_supported(gateway, target, "warm", real, alive)
    payload: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        **_content("", chat=chat),
        "done_reason": "unload" if unload else "load",
        "done": True,
    }
    return JSONResponse(payload)


async def _model_op_if_supported(
    gateway: Gateway, node: str, op: ModelOpKind, model: str, keep_alive: str | None
) -> None:
    try:
        await gateway.model_op(node, op, model, keep_alive=keep_alive)
    except HttpError as exc:
        if exc.status != 501:  # 501: the node's backend does not manage models
            raise


def _details(info: ModelInfo | None) -> dict[str, Any]:
    family = (info.family if info else None) or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": (info.parameter_size if info else None) or "",
        "quantization_level": (info.quantization if info else None) or "",
    }


def _corral(entry: CatalogEntry) -> dict[str, Any]:
    return {"nodes": entry.nodes, "loaded_on": entry.loaded_on, "alias_of": entry.alias_of}


async def tags(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    models = [
        {
            "name": e.name,
            "model": e.name,
            "modified_at": _now(),
            "size": (e.info.size_bytes if e.info else None) or 0,
            "digest": "",
            "details": _details(e.info),
            "corral": _corral(e),
        }
        for e in await catalog(gateway)
    ]
    return JSONResponse({"models": models})


async def ps(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    models = []
    for e in await catalog(gateway):
        if not e.loaded_on or e.alias_of:
            continue
        info = e.info
        until = info.loaded_until if info and info.loaded_until else time.time() + 300
        size = (info.loaded_bytes or info.size_bytes or 0) if info else 0
        models.append(
            {
                "name": e.name,
                "model": e.name,
                "size": size,
                "digest": "",
                "details": _details(info),
                "expires_at": datetime.fromtimestamp(until, UTC).isoformat(),
                "size_vram": (info.loaded_vram_bytes or 0) if info else 0,
                "context_length": (info.context_length or 0) if info else 0,
                "corral": _corral(e),
            }
        )
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    model = _model_of(await gateway.read_json(request))
    name, _node = split_model(model)
    entry = find(await catalog(gateway), name or "")
    if entry is None:
        raise HttpError(404, f"model '{model}' not found", code="model_not_found")
    info = entry.info
    family = (info.family if info else None) or "unknown"
    model_info: dict[str, Any] = {"general.architecture": family}
    if info is not None and info.context_length is not None:
        model_info[f"{family}.context_length"] = info.context_length
    capabilities = sorted(info.capabilities) if info and info.capabilities else ["chat"]
    return JSONResponse(
        {
            "license": "",
            "modelfile": f"# served by corral from {', '.join(entry.nodes)}\nFROM {entry.name}\n",
            "parameters": "",
            "template": "",
            "details": _details(info),
            "model_info": model_info,
            # Ollama calls chat "completion".
            "capabilities": [_OLLAMA_CAPABILITY.get(c, c) for c in capabilities],
            "modified_at": _now(),
            "corral": _corral(entry),
        }
    )


def corral_version() -> str:
    try:
        return version("corral")
    except PackageNotFoundError:
        return "0.1.0"


async def api_version(request: Request) -> Response:
    return JSONResponse({"version": corral_version()})


def routes() -> list[Route]:
    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", api_version, methods=["GET"]),
        Route("/api/embed", ollama_embed, methods=["POST"]),
        Route("/api/embeddings", ollama_embeddings, methods=["POST"]),
    ]


__all__ = ["error_body", "routes"]
