"""What only Anthropic's Messages API does, against its fake (the rest: test_contract.py)."""

from __future__ import annotations

import pytest

from broker.errors import (
    BackendError,
    BackendRateLimited,
    BackendUnavailable,
    ContentBlocked,
    QuotaExhausted,
)
from broker.schemas import ChatMessage, GenerationOptions
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.worker.backends.contract import PLANTED_KEY, SETUPS, with_backend
from worker.backends.anthropic import AnthropicBackend
from worker.backends.base import Backend, Chunk

ANTHROPIC = next(s for s in SETUPS if s.id == "anthropic")
CONVERSATION = (
    ChatMessage(role="system", content="You are terse."),
    ChatMessage(role="user", content="hi"),
    ChatMessage(role="assistant", content="hello"),
    ChatMessage(role="user", content="and now?"),
)


async def converse(backend: Backend) -> list[Chunk]:
    options = GenerationOptions(temperature=1.5)
    return [c async for c in backend.stream_chat("claude-test-1", CONVERSATION, options)]


def failure(fake_url: str) -> BackendError:
    with pytest.raises(BackendError) as caught:
        with_backend(ANTHROPIC, fake_url, converse)
    assert PLANTED_KEY not in str(caught.value)
    return caught.value


def test_the_request_has_a_top_level_system_and_anthropics_headers() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY) as fake:
        with_backend(ANTHROPIC, fake.url, converse)
        (body,) = fake.state.chat_bodies
        headers = fake.state.headers_seen[-1]
    assert body["system"] == "You are terse."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["stream"] is True and body["max_tokens"] == 4096
    assert body["temperature"] == 1.0  # corral's 0..2 scale, clamped to Anthropic's 0..1
    assert headers["x-api-key"] == PLANTED_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers


def test_overloaded_mid_stream_after_the_200_is_unavailable_and_retryable() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, error_after=4) as fake:
        fake.state.error_type, fake.state.error_message = "overloaded_error", "Overloaded"
        error = failure(fake.url)
    assert type(error) is BackendUnavailable and error.retryable
    assert "overloaded_error: Overloaded" in str(error)


def test_a_rate_limit_error_event_is_a_rate_limit() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, error_after=1) as fake:
        fake.state.error_type = "rate_limit_error"
        error = failure(fake.url)
    assert type(error) is BackendRateLimited


def test_529_overloaded_is_unavailable() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, fail_status=529) as fake:
        fake.state.fail_message = "Overloaded"
        error = failure(fake.url)
    assert type(error) is BackendUnavailable and "HTTP 529" in str(error)


def test_529_with_retry_after_carries_the_wait_for_the_breaker() -> None:
    with running_fake_anthropic(
        api_key=PLANTED_KEY, fail_status=529, fail_headers={"retry-after": "3"}
    ) as fake:
        error = failure(fake.url)
    assert type(error) is BackendUnavailable and error.retry_after == 3


def test_a_spend_limit_429_without_retry_after_is_an_exhausted_quota() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, fail_status=429) as fake:
        fake.state.fail_message = "You have reached your specified API usage limits."
        spent = failure(fake.url)
        fake.state.fail_headers = {"retry-after": "5"}
        fake.state.fail_message = "Number of request tokens has exceeded your rate limit"
        waiting = failure(fake.url)
    assert type(spent) is QuotaExhausted
    assert type(waiting) is BackendRateLimited and waiting.retry_after == 5


def test_a_refusal_is_content_blocked_and_final() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, refuse=True) as fake:
        error = failure(fake.url)
    assert type(error) is ContentBlocked and not error.retryable


def test_rate_limit_headers_are_recorded() -> None:
    async def chat_and_read(backend: Backend) -> dict[str, str]:
        await converse(backend)
        assert isinstance(backend, AnthropicBackend)
        return backend.rate_limits.latest

    with running_fake_anthropic(api_key=PLANTED_KEY) as fake:
        latest = with_backend(ANTHROPIC, fake.url, chat_and_read)
    assert latest["anthropic-ratelimit-requests-remaining"] == "49"
    assert all(PLANTED_KEY not in v for v in latest.values())


def test_the_model_list_follows_pages() -> None:
    models = [f"claude-test-{i}" for i in range(5)]
    with running_fake_anthropic(api_key=PLANTED_KEY, models=models, page_size=2) as fake:
        listed = with_backend(ANTHROPIC, fake.url, lambda b: b.inventory())
        assert fake.state.model_listings == 3
    assert [m.name for m in listed] == models
    assert all(m.loaded for m in listed)
