"""Tools, tool results and images through the Anthropic and Gemini adapters, against fakes
that check the request shapes the way the providers do (400 on a result without its call, a
schema key Gemini does not know, a Gemini 3 call replayed without its signature...)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import BackendError, BackendProtocolError, UnsupportedRequest
from broker.schemas import ChatMessage, GenerationOptions, ToolCall, ToolDefinition
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.fakes.fake_gemini import running_fake_gemini
from worker.backends.anthropic import AnthropicBackend
from worker.backends.base import Backend, Chunk
from worker.backends.google import GoogleBackend
from worker.backends.google_wire import SKIP_SIGNATURE

T = TypeVar("T")
KEY = "sk-test-tools-0000"
ARGUMENTS = {"city": "Paris", "days": 2, "units": {"temperature": "celsius"}}
WEATHER = ToolDefinition.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The forecast for a city.",
            "parameters": {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": ["integer", "null"]},
                    "units": {
                        "type": "object",
                        "properties": {"temperature": {"type": "string", "const": "celsius"}},
                        "additionalProperties": False,
                    },
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)
CLOCK = ToolDefinition.model_validate({"type": "function", "function": {"name": "now"}})
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(16)).decode()
OPTIONS = GenerationOptions()


def round_trip(first: ChatMessage, *calls: ToolCall) -> tuple[ChatMessage, ...]:
    """A question, the model's calls, one result per call (as the gateway links them)."""
    results = [
        ChatMessage(role="tool", content=json.dumps({"sky": "sunny", "n": n}), tool_call_id=c.id)
        for n, c in enumerate(calls)
    ]
    return (
        ChatMessage(role="system", content="Use the tools."),
        first,
        ChatMessage(role="assistant", content="Let me look.", tool_calls=calls),
        *results,
    )


def run(
    make: Callable[[httpx.AsyncClient], Backend], scenario: Callable[[Backend], Awaitable[T]]
) -> T:
    async def main() -> T:
        async with httpx.AsyncClient(timeout=10) as client:
            return await scenario(make(client))

    return asyncio.run(main())


def chat(
    model: str, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = ()
) -> Callable[[Backend], Awaitable[list[Chunk]]]:
    async def scenario(backend: Backend) -> list[Chunk]:
        return [c async for c in backend.stream_chat(model, messages, OPTIONS, tools)]

    return scenario


def anthropic(url: str) -> Callable[[httpx.AsyncClient], Backend]:
    return lambda client: AnthropicBackend(
        "claude", url, client, SecretStr(KEY), key_source="ANTHROPIC_API_KEY"
    )


def gemini(url: str) -> Callable[[httpx.AsyncClient], Backend]:
    return lambda client: GoogleBackend(
        "gemini", url, client, SecretStr(KEY), key_source="GEMINI_API_KEY"
    )


def calls_in(chunks: list[Chunk]) -> list[ToolCall]:
    return [call for chunk in chunks for call in chunk.tool_calls]


# --- Anthropic -------------------------------------------------------------------------------


def test_anthropic_streams_a_tool_use_block_as_one_whole_call() -> None:
    question = ChatMessage(role="user", content="Weather in Paris?")
    with running_fake_anthropic(api_key=KEY, tool_input=ARGUMENTS) as fake:
        fake.state.tool_preamble = "I will check."
        chunks = run(anthropic(fake.url), chat("claude-test-1", [question], [WEATHER, CLOCK]))
        (body,) = fake.state.chat_bodies
    assert "".join(c.text for c in chunks) == "I will check."
    assert calls_in(chunks) == [
        ToolCall(id="toolu_01Fake", name="get_weather", arguments=ARGUMENTS)
    ]
    assert chunks[-1].done and chunks[-1].finish_reason == "tool_calls"
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The forecast for a city.",
            "input_schema": WEATHER.function.parameters,  # Anthropic takes JSON Schema whole
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body  # auto, Anthropic's default


def test_anthropic_gets_calls_as_tool_use_blocks_and_their_results_in_one_user_turn() -> None:
    calls = (
        ToolCall(id="toolu_a", name="get_weather", arguments=ARGUMENTS),
        ToolCall(id="toolu_b", name="now"),
    )
    messages = round_trip(ChatMessage(role="user", content="Weather in Paris?"), *calls)
    with running_fake_anthropic(api_key=KEY, tool_input=ARGUMENTS, reply="Sunny.") as fake:
        chunks = run(anthropic(fake.url), chat("claude-test-1", messages, [WEATHER, CLOCK]))
        (body,) = fake.state.chat_bodies
    assert "".join(c.text for c in chunks) == "Sunny."  # the fake accepted the shapes
    assert chunks[-1].finish_reason == "stop" and not calls_in(chunks)
    assert body["system"] == "Use the tools."
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": ARGUMENTS},
                {"type": "tool_use", "id": "toolu_b", "name": "now", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "content": '{"sky": "sunny", "n": 0}',
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": '{"sky": "sunny", "n": 1}',
                },
            ],
        },
    ]


def test_a_result_naming_only_its_function_answers_the_latest_call_of_it() -> None:
    call = ToolCall(id="toolu_w", name="get_weather", arguments=ARGUMENTS)
    messages = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="rain", name="get_weather"),  # Ollama's clients
        ChatMessage(role="user", content="And tomorrow?"),
    ]
    with running_fake_anthropic(api_key=KEY) as fake:
        run(anthropic(fake.url), chat("claude-test-1", messages, [WEATHER]))
        (body,) = fake.state.chat_bodies
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_w", "name": "get_weather", "input": ARGUMENTS}
    ]  # no empty text block: Anthropic refuses those
    # The words after the results join the results' turn, after them (roles alternate).
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_w", "content": "rain"},
            {"type": "text", "text": "And tomorrow?"},
        ],
    }


def test_anthropic_refuses_a_result_for_a_call_it_never_made_and_the_adapter_says_so() -> None:
    messages = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(role="assistant", content="Checking."),
        ChatMessage(role="tool", content="rain", tool_call_id="toolu_ghost"),
    ]
    with (
        running_fake_anthropic(api_key=KEY) as fake,
        pytest.raises(BackendError, match=r"unexpected `tool_use_id`.*toolu_ghost"),
    ):
        run(anthropic(fake.url), chat("claude-test-1", messages, [WEATHER]))


def test_anthropic_gets_images_as_base64_blocks_before_the_text_typed_by_their_bytes() -> None:
    look = ChatMessage(role="user", content="What is this?", images=(PNG_B64, JPEG_B64))
    with running_fake_anthropic(api_key=KEY) as fake:
        run(anthropic(fake.url), chat("claude-test-1", [look]))
        (body,) = fake.state.chat_bodies
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/jpeg", "data": JPEG_B64},
        },
        {"type": "text", "text": "What is this?"},
    ]


def test_an_image_anthropic_cannot_read_is_refused_before_any_request() -> None:
    tiff = base64.b64encode(b"II*\x00" + bytes(16)).decode()
    look = ChatMessage(role="user", content="What is this?", images=(tiff,))
    with running_fake_anthropic(api_key=KEY) as fake:
        with pytest.raises(UnsupportedRequest, match="PNG, JPEG, GIF or WebP"):
            run(anthropic(fake.url), chat("claude-test-1", [look]))
        assert fake.state.message_requests == 0


def scripted_anthropic(events: list[dict[str, Any]]) -> Callable[[httpx.AsyncClient], Backend]:
    """An adapter whose every request gets these SSE events (for what no fake sends)."""
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return lambda _: AnthropicBackend(
        "claude",
        "https://api.anthropic.test",
        httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        SecretStr(KEY),
        key_source="ANTHROPIC_API_KEY",
    )


def test_a_tool_use_block_whose_input_is_not_json_is_a_protocol_error() -> None:
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}},
        {"type": "message_stop"},
    ]
    question = [ChatMessage(role="user", content="Weather?")]
    with pytest.raises(BackendProtocolError, match="bad tool_use block"):
        run(scripted_anthropic(events), chat("claude-test-1", question, [WEATHER]))


def test_a_tool_loop_step_goes_without_thinking_which_corral_cannot_replay() -> None:
    """Anthropic wants a thinking turn's signed thinking block back with its tool_use; corral
    keeps neither, so the step that sends results back leaves thinking off (the fake, like
    Anthropic, refuses it otherwise); the first step still thinks."""
    call = ToolCall(id="toolu_a", name="get_weather", arguments=ARGUMENTS)
    question = ChatMessage(role="user", content="Weather in Paris?")
    effort = GenerationOptions(effort="high")

    async def both(backend: Backend) -> None:
        async for _ in backend.stream_chat("claude-test-1", [question], effort, [WEATHER]):
            pass
        async for _ in backend.stream_chat(
            "claude-test-1", round_trip(question, call), effort, [WEATHER]
        ):
            pass

    with running_fake_anthropic(api_key=KEY) as fake:
        run(anthropic(fake.url), both)
        first, second = fake.state.chat_bodies
    assert "thinking" in first and "thinking" not in second


# --- Gemini ----------------------------------------------------------------------------------


def test_gemini_streams_a_function_call_with_a_made_up_id_and_finishes_with_tool_calls() -> None:
    question = ChatMessage(role="user", content="Weather in Paris?")
    with running_fake_gemini(api_key=KEY, call_args=ARGUMENTS) as fake:
        chunks = run(gemini(fake.url), chat("gemini-test-flash", [question], [WEATHER, CLOCK]))
        (body,) = fake.state.chat_bodies
    assert calls_in(chunks) == [ToolCall(id="call_0", name="get_weather", arguments=ARGUMENTS)]
    assert chunks[-1].done and chunks[-1].finish_reason == "tool_calls"
    (tools,) = body["tools"]
    weather, clock = tools["functionDeclarations"]
    assert clock == {"name": "now"}  # no parameters: an empty object schema would be a 400
    assert weather["description"] == "The forecast for a city."
    # Cut down to Gemini's Schema (the fake, like Gemini, refuses any other key).
    assert weather["parameters"] == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "nullable": True},
            "units": {
                "type": "object",
                "properties": {"temperature": {"type": "string", "enum": ["celsius"]}},
            },
        },
        "required": ["city"],
    }


@pytest.mark.parametrize(
    ("model", "signed"), [("gemini-2.5-flash", False), ("gemini-3-test-pro", True)]
)
def test_gemini_gets_calls_and_their_results_by_function_name(model: str, signed: bool) -> None:
    calls = (
        ToolCall(id="call_0", name="get_weather", arguments=ARGUMENTS),
        ToolCall(id="call_1", name="now"),
    )
    messages = round_trip(ChatMessage(role="user", content="Weather in Paris?"), *calls)
    with running_fake_gemini(api_key=KEY, models=[model], reply="Sunny.") as fake:
        fake.state.call_args = ARGUMENTS
        chunks = run(gemini(fake.url), chat(model, messages, [WEATHER, CLOCK]))
        (body,) = fake.state.chat_bodies
    assert "".join(c.text for c in chunks) == "Sunny."  # the fake accepted the turns
    assert chunks[-1].finish_reason == "stop"
    model_turn, results = body["contents"][1:]
    signature = {"thoughtSignature": SKIP_SIGNATURE} if signed else {}
    assert model_turn == {
        "role": "model",
        "parts": [
            {"text": "Let me look."},
            {"functionCall": {"name": "get_weather", "args": ARGUMENTS}, **signature},
            {"functionCall": {"name": "now", "args": {}}, **signature},
        ],
    }
    assert results == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"sky": "sunny", "n": 0}}},
            {"functionResponse": {"name": "now", "response": {"sky": "sunny", "n": 1}}},
        ],
    }


def test_a_malformed_function_call_is_a_protocol_error_not_an_answer() -> None:
    event = {"candidates": [{"content": {"parts": []}, "finishReason": "MALFORMED_FUNCTION_CALL"}]}

    def handler(request: httpx.Request) -> httpx.Response:
        body = f"data: {json.dumps(event)}\r\n\r\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    def make(_: httpx.AsyncClient) -> Backend:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return GoogleBackend("g", "https://g.test", client, SecretStr(KEY), key_source="K")

    question = [ChatMessage(role="user", content="Weather?")]
    with pytest.raises(BackendProtocolError, match="MALFORMED_FUNCTION_CALL"):
        run(make, chat("gemini-test-flash", question, [WEATHER]))


def test_a_gemini_3_call_replayed_without_a_signature_is_what_the_fake_refuses() -> None:
    """The fake's check the sentinel above answers: without it, Gemini 3 says 400."""
    contents = [
        {"role": "user", "parts": [{"text": "Weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "now", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "now", "response": {}}}]},
    ]
    with running_fake_gemini(api_key=KEY, models=["gemini-3-test-pro"]) as fake:
        answer = httpx.post(
            f"{fake.url}/v1beta/models/gemini-3-test-pro:streamGenerateContent?alt=sse",
            json={"contents": contents},
            headers={"x-goog-api-key": KEY},
        )
    assert answer.status_code == 400 and "thought_signature" in answer.text


def test_a_text_result_is_wrapped_as_output_and_images_are_inline_data() -> None:
    call = ToolCall(id="call_0", name="now")
    messages = [
        ChatMessage(role="user", content="What time is it here?", images=(PNG_B64,)),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="noon", tool_call_id="call_0"),
    ]
    with running_fake_gemini(api_key=KEY) as fake:
        run(gemini(fake.url), chat("gemini-test-flash", messages, [CLOCK]))
        (body,) = fake.state.chat_bodies
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"inline_data": {"mime_type": "image/png", "data": PNG_B64}},
                {"text": "What time is it here?"},
            ],
        },
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "now", "args": {}}, "thoughtSignature": SKIP_SIGNATURE}
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "now", "response": {"output": "noon"}}}],
        },
    ]


def test_a_gemini_result_answering_no_known_call_is_refused_before_any_request() -> None:
    messages = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(role="tool", content="rain", tool_call_id="call_9"),
    ]
    with running_fake_gemini(api_key=KEY) as fake:
        with pytest.raises(UnsupportedRequest, match="names no function"):
            run(gemini(fake.url), chat("gemini-test-flash", messages, [WEATHER]))
        assert fake.state.chat_bodies == []
