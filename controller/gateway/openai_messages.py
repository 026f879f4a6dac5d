"""Reading an OpenAI chat request's messages: text and image parts, tool calls and results."""

from __future__ import annotations

from typing import Any

from broker.schemas import ChatMessage, Role
from controller.gateway.errors import bad_request
from controller.gateway.image_urls import ImageFetcher
from controller.gateway.tool_wire import (
    chat_message,
    link_tool_results,
    parse_openai_tool_calls,
)

__all__ = ["messages_from"]

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


async def _content(content: object, index: int, images: ImageFetcher) -> tuple[str, list[str]]:
    """A message's text, and its images as base64: a string, or a list of text and
    ``image_url`` parts."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise bad_request(f"messages[{index}].content must be a string or a list of parts")
    texts: list[str] = []
    found: list[str] = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if isinstance(part, dict) and kind == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise bad_request(f"messages[{index}].content[{position}]: image_url needs a url")
            where = f"messages[{index}].content[{position}]"
            found.append(await images.image(url, where))
        else:
            raise bad_request(
                f"messages[{index}]: content parts of type {kind!r} are not supported"
                " (text and image_url)"
            )
    return "".join(texts), found


async def messages_from(body: dict[str, Any], images: ImageFetcher) -> list[ChatMessage]:
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
                " (system, developer, user, assistant, tool)"
            )
        text, found = await _content(message.get("content"), index, images)
        fields: dict[str, Any] = {"role": role, "content": text, "images": found}
        if role == "assistant":
            fields["tool_calls"] = parse_openai_tool_calls(index, message.get("tool_calls"))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"messages[{index}]: a tool message needs its tool_call_id")
            fields["tool_call_id"] = call_id
            fields["name"] = message.get("name") or None
        messages.append(chat_message(index, **fields))
    return link_tool_results(messages)
