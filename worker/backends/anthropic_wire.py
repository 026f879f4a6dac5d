"""corral's chat as an Anthropic Messages request body (the adapter is ``anthropic.py``).

The shape, from Anthropic's Messages API reference: system messages go into the top-level
``system``; the rest alternate ``user`` / ``assistant``. An assistant's tool calls are
``tool_use`` content blocks after its text; a tool's result is a ``tool_result`` block in a
*user* message, naming the ``tool_use_id`` it answers, and the results of one turn's calls
share one user message (so are any user words that follow them, after the results, since
the roles must alternate). Images are base64 ``image`` blocks before the text, with the
media type the bytes show. Tools are ``{name, description, input_schema}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.errors import UnsupportedRequest
from broker.schemas import ChatMessage, GenerationOptions, ToolDefinition
from worker.backends.effort import anthropic_thinking
from worker.backends.images import sniff_image_type

__all__ = ["anthropic_messages", "anthropic_tools", "messages_request_body"]

EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
"""A function without parameters: ``input_schema`` is required all the same."""


def anthropic_tools(tools: Sequence[ToolDefinition]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function = tool.function
        wire: dict[str, Any] = {
            "name": function.name,
            "input_schema": function.parameters or EMPTY_SCHEMA,
        }
        if function.description:
            wire["description"] = function.description
        out.append(wire)
    return out


def _image_blocks(message: ChatMessage, index: int) -> list[dict[str, Any]]:
    blocks = []
    for number, image in enumerate(message.images):
        media_type = sniff_image_type(image)
        if media_type is None:
            raise UnsupportedRequest(
                f"message {index}, image {number}: Anthropic takes PNG, JPEG, GIF or WebP "
                "images only, and these bytes are none of them"
            )
        source = {"type": "base64", "media_type": media_type, "data": image}
        blocks.append({"type": "image", "source": source})
    return blocks


def _text_block(text: str) -> list[dict[str, Any]]:
    # Anthropic refuses an empty text block: leave it out.
    return [{"type": "text", "text": text}] if text else []


def _answered_call(message: ChatMessage, index: int, calls: list[tuple[str, str]]) -> str:
    """The ``tool_use_id`` a tool message answers: its own, or (a client that names only the
    function, as Ollama's does) the latest call of that function."""
    if message.tool_call_id:
        return message.tool_call_id
    named = [call_id for call_id, name in calls if name == message.name]
    if message.name and named:
        return named[-1]
    raise UnsupportedRequest(
        f"message {index} is a tool result that names no call (no tool_call_id) and no"
        " function called earlier: Anthropic needs the id of the call it answers"
    )


def anthropic_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    calls: list[tuple[str, str]] = []  # (id, function) of the calls made so far
    # The user message that collects one turn's tool results (and the user words after them).
    results: list[dict[str, Any]] | None = None
    for index, message in enumerate(messages):
        if message.role == "system":
            continue
        if message.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": _answered_call(message, index, calls),
                "content": message.content,
            }
            if message.images:
                block["content"] = [
                    *_image_blocks(message, index),
                    *_text_block(message.content),
                ]
            if results is None:
                results = []
                out.append({"role": "user", "content": results})
            results.append(block)
            continue
        if message.role == "user" and results is not None:
            results += [*_image_blocks(message, index), *_text_block(message.content)]
            results = None
            continue
        results = None
        if message.role == "assistant":
            calls += [(c.id, c.name) for c in message.tool_calls]
            if message.images:
                raise UnsupportedRequest(
                    f"message {index}: Anthropic takes images in user turns only"
                )
            if not message.tool_calls:
                out.append({"role": "assistant", "content": message.content})
                continue
            uses = [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in message.tool_calls
            ]
            out.append({"role": "assistant", "content": [*_text_block(message.content), *uses]})
            continue
        if message.images:
            content = [*_image_blocks(message, index), *_text_block(message.content)]
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": "user", "content": message.content})
    return out


def messages_request_body(
    model: str,
    messages: Sequence[ChatMessage],
    options: GenerationOptions,
    max_tokens: int,
    tools: Sequence[ToolDefinition] = (),
) -> dict[str, Any]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    body: dict[str, Any] = {
        "model": model,
        "messages": anthropic_messages(messages),
        "max_tokens": options.max_tokens or max_tokens,
        "stream": True,
    }
    if tools:
        # tool_choice stays Anthropic's default, auto: corral's API takes no other.
        body["tools"] = anthropic_tools(tools)
    if system:
        body["system"] = system
    thinking = anthropic_thinking(options.effort) if options.effort else None
    if thinking is not None and messages and messages[-1].role == "tool":
        # Continuing a tool loop with thinking on, Anthropic wants the last assistant turn to
        # start with the thinking block it sent, signed: corral's messages do not keep it, so
        # this step of the loop goes without thinking rather than be refused (400).
        thinking = None
    if thinking is not None:
        body["thinking"] = thinking
        # The budget is part of max_tokens, which must exceed it: the answer keeps its own.
        body["max_tokens"] += thinking["budget_tokens"]
    if options.temperature is not None and thinking is None:
        # Anthropic's range is 0..1; corral's is OpenAI's 0..2. Thinking refuses any
        # temperature but its own.
        body["temperature"] = min(options.temperature, 1.0)
    if options.stop:
        body["stop_sequences"] = list(options.stop)
    return body
