"""Tools, tool calls and images as both APIs write them, to and from corral's messages.

OpenAI and Ollama describe a tool the same way (``{"type": "function", "function": {...}}``);
they differ in a call's arguments (OpenAI: a JSON *string*; Ollama: an object), in how a tool's
result names its call (``tool_call_id`` / ``tool_name``) and in images (content parts with URLs
/ a list of base64 strings).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from broker.schemas import ChatMessage, ToolCall, ToolDefinition, describe_validation_error
from controller.gateway.errors import bad_request

__all__ = [
    "chat_message",
    "link_tool_results",
    "ollama_tool_calls",
    "openai_tool_call_deltas",
    "openai_tool_calls",
    "parse_ollama_tool_calls",
    "parse_openai_tool_calls",
    "tools_from",
]


def tools_from(body: dict[str, Any]) -> tuple[ToolDefinition, ...]:
    """The request's ``tools``, checked against the function-tool shape; 400 if malformed."""
    raw = body.get("tools")
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise bad_request("'tools' must be a list of function definitions", "invalid_tools")
    try:
        return tuple(ToolDefinition.model_validate(tool) for tool in raw)
    except ValidationError as exc:
        raise bad_request(
            f"invalid tools: {describe_validation_error(exc)}", "invalid_tools"
        ) from None


def chat_message(index: int, **fields: Any) -> ChatMessage:
    """A ``ChatMessage`` or a 400 naming the message and the field at fault."""
    try:
        return ChatMessage.model_validate(fields)
    except ValidationError as exc:
        raise bad_request(f"messages[{index}]: {describe_validation_error(exc)}") from None


def _json_string_object(arguments: object) -> dict[str, Any] | None:
    """OpenAI's arguments: a JSON string holding an object (empty: no arguments)."""
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _plain_object(arguments: object) -> dict[str, Any] | None:
    """Ollama's arguments: an object."""
    if arguments is None:
        return {}
    return arguments if isinstance(arguments, dict) else None


def _parse_tool_calls(
    index: int,
    raw: object,
    read_arguments: Callable[[object], dict[str, Any] | None],
    arguments_are: str,
) -> tuple[ToolCall, ...]:
    if not raw:
        return ()
    if not isinstance(raw, list):
        raise bad_request(f"messages[{index}].tool_calls must be a list")
    calls = []
    for position, call in enumerate(raw):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise bad_request(f"messages[{index}].tool_calls: each needs a 'function' object")
        function = call["function"]
        arguments = read_arguments(function.get("arguments"))
        if arguments is None:
            raise bad_request(
                f"messages[{index}].tool_calls[{position}].function.arguments must be"
                f" {arguments_are}"
            )
        call_id = call.get("id") or f"call_{index}_{position}"
        calls.append(_tool_call(index, call_id, function.get("name"), arguments))
    return tuple(calls)


def parse_openai_tool_calls(index: int, raw: object) -> tuple[ToolCall, ...]:
    """An assistant message's calls, their arguments a JSON string holding an object."""
    return _parse_tool_calls(index, raw, _json_string_object, "a JSON string holding an object")


def parse_ollama_tool_calls(index: int, raw: object) -> tuple[ToolCall, ...]:
    """An assistant message's calls in Ollama's shape: the arguments an object, no id."""
    return _parse_tool_calls(index, raw, _plain_object, "an object")


def _tool_call(index: int, call_id: object, name: object, arguments: dict[str, Any]) -> ToolCall:
    try:
        return ToolCall.model_validate({"id": call_id, "name": name, "arguments": arguments})
    except ValidationError as exc:
        raise bad_request(
            f"messages[{index}].tool_calls: {describe_validation_error(exc)}"
        ) from None


def openai_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in calls
    ]


def openai_tool_call_deltas(calls: tuple[ToolCall, ...], first_index: int) -> list[dict[str, Any]]:
    """Streamed calls: each whole in one delta, numbered on from ``first_index``."""
    return [{"index": first_index + n, **call} for n, call in enumerate(openai_tool_calls(calls))]


def ollama_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "function": {"index": n, "name": call.name, "arguments": call.arguments}}
        for n, call in enumerate(calls)
    ]


def link_tool_results(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Give each tool result both its call's id and its function's name.

    OpenAI names a result by ``tool_call_id`` only and Ollama by ``tool_name`` only; a backend
    of the other kind needs the other, which the assistant message that made the call holds.
    """
    names_by_id: dict[str, str] = {}
    unanswered: list[ToolCall] = []
    linked = []
    for message in messages:
        if message.tool_calls:
            names_by_id.update((call.id, call.name) for call in message.tool_calls)
            unanswered = list(message.tool_calls)
        if message.role == "tool":
            call_id = message.tool_call_id
            name = message.name or (names_by_id.get(call_id) if call_id else None)
            if call_id is None:
                match = next((c for c in unanswered if name is None or c.name == name), None)
                call_id = match.id if match else None
            unanswered = [c for c in unanswered if c.id != call_id]
            linked.append(message.model_copy(update={"tool_call_id": call_id, "name": name}))
        else:
            linked.append(message)
    return linked
