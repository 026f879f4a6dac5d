"""corral's chat as a Gemini ``generateContent`` request body (the adapter is ``google.py``).

From the Gemini API reference: ``contents`` alternate roles ``user`` and ``model``, each with
``parts``; system messages become ``systemInstruction``. An assistant's tool calls are
``functionCall`` parts (``name``, ``args``) of a ``model`` content; a tool's result is a
``functionResponse`` part (``name``, ``response`` object) of a ``user`` content, and the
results of one turn's calls share one content. Images are ``inline_data`` parts. Tools are
``{"functionDeclarations": [{name, description, parameters}]}``, where ``parameters`` is
Gemini's subset of OpenAPI's Schema: keys outside it (``additionalProperties``, ``$schema``,
``$ref``...) are refused with a 400, so they are left out.

Gemini 3 signs each function call it makes (``thoughtSignature``) and refuses, with a 400, a
replayed call without its signature. corral's calls travel through APIs with no place for one
(OpenAI's keeps only the id), so a replayed call carries the sentinel Google documents for
calls whose signature was lost (``SKIP_SIGNATURE``); older models, which never asked for one,
get none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from broker.errors import UnsupportedRequest
from broker.schemas import ChatMessage, GenerationOptions, ToolCall, ToolDefinition
from worker.backends.effort import gemini_thinking_budget
from worker.backends.images import image_media_type

__all__ = ["gemini_contents", "gemini_schema", "gemini_tools", "generate_request_body"]

SKIP_SIGNATURE = "skip_thought_signature_validator"
UNSIGNED_FAMILIES = ("gemini-1.", "gemini-2.")
"""Models that do not check the signatures of replayed calls."""

SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    }
)
"""The fields of Gemini's ``Schema`` object (its API reference); any other key is a 400."""


def gemini_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema cut down to the fields Gemini's ``Schema`` has, at every depth.

    A JSON Schema type list such as ``["string", "null"]`` becomes the one type and
    ``nullable``; ``const`` becomes a one-value ``enum``."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "const":
            out["enum"] = [value]
        elif key not in SCHEMA_KEYS:
            continue
        elif key == "type" and isinstance(value, list):
            kinds = [k for k in value if k != "null"]
            if kinds:
                out["type"] = kinds[0]
            if "null" in value:
                out["nullable"] = True
        elif key == "properties" and isinstance(value, dict):
            out[key] = {
                name: gemini_schema(sub) if isinstance(sub, dict) else sub
                for name, sub in value.items()
            }
        elif key == "items" and isinstance(value, dict):
            out[key] = gemini_schema(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [gemini_schema(sub) if isinstance(sub, dict) else sub for sub in value]
        else:
            out[key] = value
    return out


def gemini_tools(tools: Sequence[ToolDefinition]) -> list[dict[str, Any]]:
    declarations = []
    for tool in tools:
        function = tool.function
        declaration: dict[str, Any] = {"name": function.name}
        if function.description:
            declaration["description"] = function.description
        # An object schema without properties is a 400 ("should be non-empty for OBJECT
        # type"): a function without parameters leaves the field out.
        if function.parameters.get("properties"):
            declaration["parameters"] = gemini_schema(function.parameters)
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def _function_response(text: str) -> dict[str, Any]:
    """A tool's result as the object ``functionResponse.response`` must be: a JSON object as
    it is, anything else under ``output`` (the key the reference names for a result)."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"output": text}
    return parsed if isinstance(parsed, dict) else {"output": parsed}


def _answered_function(message: ChatMessage, index: int, calls: dict[str, str]) -> str:
    """The function a tool message answers: its own ``name``, or its call's, found by id."""
    name = message.name or calls.get(message.tool_call_id or "")
    if name is None:
        raise UnsupportedRequest(
            f"message {index} is a tool result that names no function and no earlier call:"
            " Gemini needs the name of the function it answers"
        )
    return name


def _parts(message: ChatMessage) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"inline_data": {"mime_type": image_media_type(image), "data": image}}
        for image in message.images
    ]
    if message.content or not parts:
        parts.append({"text": message.content})
    return parts


def _function_call(call: ToolCall, signed: bool) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"name": call.name, "args": call.arguments}}
    if signed:
        part["thoughtSignature"] = SKIP_SIGNATURE
    return part


def gemini_contents(messages: Sequence[ChatMessage], model: str = "") -> list[dict[str, Any]]:
    signed = not model.removeprefix("models/").startswith(UNSIGNED_FAMILIES)
    calls: dict[str, str] = {}  # id -> function of the calls made so far (ids may repeat)
    contents: list[dict[str, Any]] = []
    results: list[dict[str, Any]] | None = None  # the parts of one turn's tool results
    for index, message in enumerate(messages):
        if message.role == "system":
            continue
        if message.role == "tool":
            response = {
                "name": _answered_function(message, index, calls),
                "response": _function_response(message.content),
            }
            if results is None:
                results = []
                contents.append({"role": "user", "parts": results})
            results.append({"functionResponse": response})
            results += [p for p in _parts(message) if "inline_data" in p]
            continue
        results = None
        if message.role == "assistant":
            calls.update((c.id, c.name) for c in message.tool_calls)
            parts = [{"text": message.content}] if message.content else []
            parts += [_function_call(c, signed) for c in message.tool_calls]
            if message.images:
                raise UnsupportedRequest(
                    f"message {index}: corral passes images to Gemini in user and tool turns only"
                )
            contents.append({"role": "model", "parts": parts or [{"text": ""}]})
        else:
            contents.append({"role": "user", "parts": _parts(message)})
    return contents


def generate_request_body(
    messages: Sequence[ChatMessage],
    options: GenerationOptions,
    model: str = "",
    tools: Sequence[ToolDefinition] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": gemini_contents(messages, model)}
    if tools:
        body["tools"] = gemini_tools(tools)
    system = [{"text": m.content} for m in messages if m.role == "system"]
    if system:
        body["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    if options.temperature is not None:
        config["temperature"] = options.temperature
    if options.max_tokens is not None:
        config["maxOutputTokens"] = options.max_tokens
    if options.stop:
        config["stopSequences"] = list(options.stop)
    if options.seed is not None:
        config["seed"] = options.seed
    if options.effort is not None:
        config["thinkingConfig"] = {"thinkingBudget": gemini_thinking_budget(options.effort, model)}
    if config:
        body["generationConfig"] = config
    return body
