"""The streamed completion's frames: encoded once around each delta, byte for byte what the
whole chunk gives through ``json.dumps`` (what the openai client and any SSE reader parse)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.gateway.frames import ChunkFrames, sse

DELTAS: list[tuple[dict[str, Any], str | None]] = [
    ({"role": "assistant", "content": "Hello"}, None),
    ({"content": ' "quoted" \\ back\nslash, ünïcödé, 中文, 🐄'}, None),
    ({"reasoning_content": "think", "content": ""}, None),
    ({"tool_calls": [{"index": 0, "id": "call_1", "function": {"arguments": "{}"}}]}, None),
    ({}, "stop"),
    ({}, "length"),
]


@pytest.mark.parametrize(("delta", "finish"), DELTAS)
def test_a_frame_is_the_whole_chunk_as_json(delta: dict[str, Any], finish: str | None) -> None:
    frames = ChunkFrames("chatcmpl-abc123", 1_767_000_000)
    frame = frames.frame("llama3.2:1b", delta, finish)
    assert frame == sse(frames.chunk("llama3.2:1b", delta, finish))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    parsed = json.loads(frame.removeprefix(b"data: "))
    assert parsed["choices"] == [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    ]
    assert parsed["model"] == "llama3.2:1b" and parsed["id"] == "chatcmpl-abc123"


def test_a_change_of_serving_model_shows_in_the_next_frame() -> None:
    frames = ChunkFrames("chatcmpl-abc123", 1)
    frames.frame("first-model", {"content": "a"}, None)
    moved = frames.frame('other "model"', {"content": "b"}, None)
    assert json.loads(moved.removeprefix(b"data: "))["model"] == 'other "model"'
    assert moved == sse(frames.chunk('other "model"', {"content": "b"}, None))
