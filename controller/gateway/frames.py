"""How answers go on the wire: compact JSON, Server-Sent Events (OpenAI) and NDJSON lines
(Ollama), one frame per token, so the per-token cost is kept to encoding what changed."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ChunkFrames", "compact_json", "ndjson", "sse"]

_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""Made once: ``json.dumps`` with separators builds an encoder on every call."""


def compact_json(value: object) -> bytes:
    return _ENCODER.encode(value).encode()


def sse(payload: object) -> bytes:
    return b"data: " + compact_json(payload) + b"\n\n"


def ndjson(payload: object) -> bytes:
    return compact_json(payload) + b"\n"


class ChunkFrames:
    """The SSE frames of one streamed chat completion. All of a chunk but its ``delta`` and
    ``finish_reason`` is the same for the whole job, so it is encoded once (again only if the
    serving model changes) and each token encodes just its delta; the bytes are those of the
    whole chunk through ``sse``."""

    _FINISH = b',"logprobs":null,"finish_reason":'
    _END = b"}]}\n\n"

    def __init__(self, completion_id: str, created: int) -> None:
        self.completion_id = completion_id
        self.created = created
        self._model: str | None = None
        self._head = b""

    def chunk(self, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        """The chunk as an object (for the rare one of another shape: the usage chunk)."""
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def frame(self, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
        if model != self._model:
            whole = sse(self.chunk(model, {}, None))
            self._head = whole[: whole.index(b'"delta":') + len(b'"delta":')]
            self._model = model
        reason = b"null" if finish is None else compact_json(finish)
        return b"".join((self._head, compact_json(delta), self._FINISH, reason, self._END))
