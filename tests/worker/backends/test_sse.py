"""The one SSE decoder every SSE adapter reads with."""

from __future__ import annotations

import asyncio

import httpx

from broker.schemas import ChatMessage, GenerationOptions
from worker.backends.base import Chunk
from worker.backends.openai_compat import OpenAICompatBackend
from worker.backends.sse import SSEDecoder, SSEEvent


def decode(text: str) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [e for line in text.splitlines() if (e := decoder.feed(line)) is not None]
    tail = decoder.flush()
    return [*events, *([tail] if tail else [])]


def test_named_events_multi_line_data_and_comments() -> None:
    text = (
        ": keep-alive\n\n"
        'event: message_start\ndata: {"a":\ndata: 1}\n\n'
        "data: plain\n\n"
        "error: slot released\n\n"
    )
    assert decode(text) == [
        SSEEvent("message_start", '{"a":\n1}'),
        SSEEvent("message", "plain"),
        SSEEvent("error", "slot released"),
    ]


def test_an_event_without_data_is_dropped_and_its_name_forgotten() -> None:
    assert decode("event: ping\n\ndata: x\n\n") == [SSEEvent("message", "x")]


def test_the_last_event_without_its_blank_line_is_kept_by_flush() -> None:
    assert decode("data: [DONE]") == [SSEEvent("message", "[DONE]")]


def test_an_adapter_reads_a_last_event_left_without_its_blank_line() -> None:
    body = (
        b'data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}\n\n'
        b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}'
    )

    async def main() -> list[Chunk]:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            backend = OpenAICompatBackend("gpu", "http://gpu:8080", client, capacity=1)
            prompt = (ChatMessage(role="user", content="hi"),)
            return [c async for c in backend.stream_chat("m", prompt, GenerationOptions())]

    chunks = asyncio.run(main())
    assert [c.text for c in chunks] == ["hi", ""] and chunks[-1].finish_reason == "stop"
