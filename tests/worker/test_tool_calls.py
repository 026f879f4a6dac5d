"""Tool calls, images and reasoning at the worker's edge: the messages' contract, the
OpenAI-compatible adapter joining streamed call pieces (the Anthropic and Gemini adapters':
tests/worker/backends/test_cloud_tools.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from pydantic import ValidationError

from broker.errors import BackendProtocolError
from broker.schemas import (
    MAX_TOOLS_BYTES,
    ChatMessage,
    GenerationOptions,
    JobSpec,
    ToolDefinition,
    ToolFunction,
)
from tests.fakes.fake_openai import running_fake_openai
from worker.backends.base import Chunk
from worker.backends.openai_compat import OpenAICompatBackend, ToolCallAccumulator, _ToolCallDelta

TOOL = ToolDefinition(function=ToolFunction(name="get_weather", parameters={"type": "object"}))
ASK = (ChatMessage(role="user", content="Weather in Paris?"),)


def test_an_image_must_be_base64_data_never_a_url() -> None:
    ChatMessage(role="user", content="look", images=("iVBORw0KGgo=",))
    for bad in ("http://169.254.169.254/latest/meta-data/", "data:image/png;base64,iVBO", ""):
        with pytest.raises(ValidationError, match="not base64"):
            ChatMessage(role="user", content="look", images=(bad,))


def test_tool_definitions_are_checked_and_size_limited() -> None:
    def spec(*tools: ToolDefinition) -> JobSpec:
        return JobSpec(job_id="job-12345678", messages=ASK, created_at=0.0, tools=tools)

    assert spec(TOOL).needs() == {"tools"}
    huge = ToolDefinition(
        function=ToolFunction(name="big", description="x" * 8000, parameters={"enum": ["y" * 10]})
    )
    with pytest.raises(ValidationError, match=f"over {MAX_TOOLS_BYTES}"):
        spec(*[huge] * 40)
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"type": "function", "function": {"name": "no spaces!"}})


def test_streamed_call_pieces_join_into_whole_calls_in_index_order() -> None:
    calls = ToolCallAccumulator()
    pieces = [
        {"index": 1, "id": "call_b", "function": {"name": "second", "arguments": ""}},
        {"index": 0, "id": "call_a", "function": {"name": "first", "arguments": '{"ci'}},
        {"index": 1, "function": {"arguments": "{}"}},
        {"index": 0, "function": {"arguments": 'ty": "Paris"}'}},
    ]
    calls.feed([_ToolCallDelta.model_validate(p) for p in pieces])
    joined = calls.calls()
    assert [(c.id, c.name, c.arguments) for c in joined] == [
        ("call_a", "first", {"city": "Paris"}),
        ("call_b", "second", {}),
    ]
    broken = ToolCallAccumulator()
    broken.feed([_ToolCallDelta.model_validate({"index": 0, "function": {"name": "f"}})])
    broken.feed([_ToolCallDelta.model_validate({"function": {"arguments": "[1, 2]"}})])
    with pytest.raises(ValueError, match="JSON object"):
        broken.calls()


def _stream(backend_url: str) -> list[Chunk]:
    async def main() -> list[Chunk]:
        async with httpx.AsyncClient() as client:
            backend = OpenAICompatBackend("gpu-box", backend_url, client, capacity=1)
            stream = backend.stream_chat("tiny-model", ASK, GenerationOptions(), tools=(TOOL,))
            return [chunk async for chunk in stream]

    return asyncio.run(main())


def test_llama_cpp_calls_end_the_stream_whole_and_bad_arguments_are_a_protocol_error() -> None:
    good = [{"id": "call_1", "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}]
    with running_fake_openai(tool_calls=good) as fake:
        chunks = _stream(fake.url)
        assert fake.state.bodies[-1]["tools"] == [TOOL.model_dump(mode="json", exclude_none=True)]
    final = chunks[-1]
    assert final.done and final.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in final.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert "".join(c.text for c in chunks) == ""

    bad = [{"id": "call_1", "name": "get_weather", "arguments": '{"city": '}]
    with running_fake_openai(tool_calls=bad) as fake, pytest.raises(BackendProtocolError):
        _stream(fake.url)
