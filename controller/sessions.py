"""Conversations that span several ``corral ask --session ID`` calls.

A session keeps its messages and the node that answered last. Follow-ups go to that node while
it is healthy (its backend still has the conversation's prompt cache warm) and carry the
history, so the model sees the whole conversation wherever it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.typing import EncodableT, FieldT

from broker import names
from broker.schemas import ChatMessage

# Enough for a long chat; the oldest turns go first (the system prompt is always kept).
MAX_MESSAGES = 64


@dataclass(frozen=True)
class Session:
    node: str | None
    messages: tuple[ChatMessage, ...]


_FIELDS = ["node", "messages"]


def _parse(raw: list[bytes | str | None]) -> Session:
    node_raw, messages_raw = raw[0], raw[1]
    messages: tuple[ChatMessage, ...] = ()
    if messages_raw:
        try:
            messages = tuple(ChatMessage.model_validate(m) for m in json.loads(messages_raw))
        except (ValueError, ValidationError):
            messages = ()  # unreadable history: start the conversation afresh
    node = node_raw.decode() if isinstance(node_raw, bytes) else node_raw
    return Session(node=node or None, messages=messages)


def _mapping(node: str, messages: tuple[ChatMessage, ...]) -> dict[FieldT, EncodableT]:
    kept = trim(messages)
    return {"node": node, "messages": json.dumps([m.model_dump() for m in kept])}


class SessionStore:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    def load(self, session_id: str) -> Session:
        return _parse(self._redis.hmget(names.session_key(session_id), _FIELDS))

    def save(self, session_id: str, node: str, messages: tuple[ChatMessage, ...]) -> None:
        key = names.session_key(session_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=_mapping(node, messages))
        pipe.expire(key, self._ttl_s)
        pipe.execute()


class AsyncSessionStore:
    """``SessionStore`` over an asyncio Redis."""

    def __init__(self, redis: AsyncRedis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def load(self, session_id: str) -> Session:
        return _parse(await self._redis.hmget(names.session_key(session_id), _FIELDS))

    async def save(self, session_id: str, node: str, messages: tuple[ChatMessage, ...]) -> None:
        key = names.session_key(session_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=_mapping(node, messages))
        pipe.expire(key, self._ttl_s)
        await pipe.execute()


def trim(messages: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """The last MAX_MESSAGES messages, keeping a leading system prompt."""
    if len(messages) <= MAX_MESSAGES:
        return messages
    head = messages[:1] if messages[0].role == "system" else ()
    return (*head, *messages[-(MAX_MESSAGES - len(head)) :])
