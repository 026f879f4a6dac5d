"""What only Google's Gemini API does, against its fake (the rest: test_contract.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.errors import BackendAuthError, BackendError, ContentBlocked, QuotaExhausted
from broker.schemas import ChatMessage, GenerationOptions
from tests.fakes.fake_gemini import quota_details, running_fake_gemini
from tests.worker.backends.contract import PLANTED_KEY, SETUPS, WRONG_KEY, with_backend
from worker.backends.base import Backend, Chunk
from worker.backends.google import seconds_to_quota_reset

GOOGLE = next(s for s in SETUPS if s.id == "google")
CONVERSATION = (
    ChatMessage(role="system", content="You are terse."),
    ChatMessage(role="user", content="hi"),
    ChatMessage(role="assistant", content="hello"),
    ChatMessage(role="user", content="and now?"),
)


async def converse(backend: Backend) -> list[Chunk]:
    options = GenerationOptions()
    return [c async for c in backend.stream_chat("gemini-test-flash", CONVERSATION, options)]


def failure(fake_url: str, key: str = PLANTED_KEY) -> BackendError:
    with pytest.raises(BackendError) as caught:
        with_backend(GOOGLE, fake_url, converse, key=key)
    assert PLANTED_KEY not in str(caught.value) and WRONG_KEY not in str(caught.value)
    return caught.value


def test_the_request_uses_contents_parts_and_system_instruction_with_the_key_in_a_header() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY) as fake:
        chunks = with_backend(GOOGLE, fake.url, converse)
        (body,) = fake.state.chat_bodies
        assert fake.state.keys_in_query == []  # a key in the URL would reach access logs
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][1]["parts"] == [{"text": "hello"}]
    assert "generationConfig" not in body  # nothing set, nothing sent
    assert chunks[-1].done and chunks[-1].finish_reason == "stop"


def test_a_safety_stop_is_content_blocked_and_not_retryable() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY, safety_after=2) as fake:
        error = failure(fake.url)
    assert type(error) is ContentBlocked and not error.retryable
    assert "finishReason SAFETY" in str(error)


def test_a_blocked_prompt_says_why() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY, block_prompt="PROHIBITED_CONTENT") as fake:
        error = failure(fake.url)
    assert type(error) is ContentBlocked
    assert "blocked the prompt: blockReason PROHIBITED_CONTENT" in str(error)


def test_a_per_day_quota_is_exhausted_not_a_wait() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY, fail_status=429) as fake:
        fake.state.fail_details = quota_details("Day", 35)
        error = failure(fake.url)
    assert type(error) is QuotaExhausted
    # Held until the quota is whole again (midnight Pacific), not for the 35 s retryDelay.
    assert error.retry_after is not None
    assert error.retry_after == pytest.approx(seconds_to_quota_reset(), abs=5)


def test_the_per_day_quota_resets_at_midnight_pacific_time() -> None:
    # 23:00 UTC on a July day is 16:00 PDT: eight hours to go.
    assert seconds_to_quota_reset(datetime(2026, 7, 1, 23, 0, tzinfo=UTC)) == 8 * 3600
    # 09:30 UTC on a December day is 01:30 PST: 22.5 hours to go.
    assert seconds_to_quota_reset(datetime(2026, 12, 2, 9, 30, tzinfo=UTC)) == 22.5 * 3600


def test_an_invalid_key_answered_400_is_an_auth_error() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY) as fake:
        error = failure(fake.url, key=WRONG_KEY)
    assert type(error) is BackendAuthError and "GEMINI_API_KEY" in str(error)


def test_only_generate_content_models_are_listed_with_their_context() -> None:
    with running_fake_gemini(api_key=PLANTED_KEY) as fake:
        models = with_backend(GOOGLE, fake.url, lambda b: b.inventory())
    assert [m.name for m in models] == ["gemini-test-flash", "gemini-test-pro"]
    assert {m.context_length for m in models} == {1_048_576}
