"""What only the OpenAI-compatible cloud providers do, against the fake (see test_contract.py),
and the model-list cache every cloud adapter uses."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import BackendError, BackendRateLimited, BackendUnavailable, QuotaExhausted
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from tests.fakes.fake_openai import running_fake_openai
from tests.worker.backends.contract import PLANTED_KEY, SETUPS, with_backend
from worker.backends.base import Backend, Chunk
from worker.backends.cloud import ModelCache
from worker.backends.http_errors import reset_seconds
from worker.backends.openai_compat import OpenAICompatBackend

CLOUD = next(s for s in SETUPS if s.id == "openai-cloud")
PROMPT = (ChatMessage(role="user", content="hi"),)


async def ask(backend: Backend) -> list[Chunk]:
    return [c async for c in backend.stream_chat("gpt-test", PROMPT, GenerationOptions())]


def test_insufficient_quota_is_exhausted_and_final() -> None:
    with running_fake_openai(api_key=PLANTED_KEY, models=["gpt-test"], fail_status=429) as fake:
        fake.state.fail_type = fake.state.fail_code = "insufficient_quota"
        fake.state.fail_message = "You exceeded your current quota, please check your plan."
        with pytest.raises(BackendError) as caught:
            with_backend(CLOUD, fake.url, ask)
    assert type(caught.value) is QuotaExhausted


def test_a_429_without_retry_after_waits_for_the_limit_at_zero_to_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0.5s",
    }
    with (
        running_fake_openai(
            api_key=PLANTED_KEY, models=["gpt-test"], fail_status=429, ratelimit_headers=headers
        ) as fake,
        pytest.raises(BackendRateLimited) as caught,
    ):
        with_backend(CLOUD, fake.url, ask)
    assert caught.value.retry_after == pytest.approx(360.5)


@pytest.mark.parametrize(
    ("value", "seconds"), [("1s", 1), ("6m0s", 360), ("120ms", 0.12), ("1h2m", 3720), ("x", None)]
)
def test_openais_reset_durations_read_as_seconds(value: str, seconds: float | None) -> None:
    assert reset_seconds(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_deepseeks_insufficient_balance_is_exhausted() -> None:
    with running_fake_openai(api_key=PLANTED_KEY, models=["gpt-test"], fail_status=402) as fake:
        fake.state.fail_message = "Insufficient Balance"
        with pytest.raises(BackendError) as caught:
            with_backend(CLOUD, fake.url, ask)
    assert type(caught.value) is QuotaExhausted and "Insufficient Balance" in str(caught.value)


def test_usage_is_asked_for_and_rate_limit_headers_are_recorded() -> None:
    async def ask_and_read(backend: Backend) -> tuple[list[Chunk], dict[str, str]]:
        chunks = await ask(backend)
        assert isinstance(backend, OpenAICompatBackend)
        return chunks, backend.rate_limits.latest

    headers = {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-tokens": "6ms"}
    with running_fake_openai(
        api_key=PLANTED_KEY, models=["gpt-test"], ratelimit_headers=headers
    ) as fake:
        chunks, latest = with_backend(CLOUD, fake.url, ask_and_read)
        (body,) = fake.state.chat_bodies
    assert body["stream_options"] == {"include_usage": True}
    assert chunks[-1].prompt_tokens == 1
    assert latest == headers


def test_a_cloud_backend_is_not_probed_for_local_server_details() -> None:
    with running_fake_openai(api_key=PLANTED_KEY, models=["gpt-test"], total_slots=8) as fake:
        backend_capacity = with_backend(CLOUD, fake.url, _capacity_after_inventory)
        assert fake.state.props_requests == 0
    assert backend_capacity == 4  # the configured one, not llama.cpp's slots


async def _capacity_after_inventory(backend: Backend) -> int:
    await backend.inventory()
    return backend.capacity


def test_a_cloud_listing_leaves_out_models_that_cannot_chat() -> None:
    listed = ["gpt-test", "text-embedding-3-small", "whisper-1", "tts-1-hd", "dall-e-3"]
    with running_fake_openai(api_key=PLANTED_KEY, models=listed) as fake:
        models = with_backend(CLOUD, fake.url, lambda b: b.inventory())
    assert [(m.name, m.serves_chat()) for m in models] == [
        ("gpt-test", True),
        ("text-embedding-3-small", False),
    ]


# --- the model-list cache ------------------------------------------------------------------


def test_the_cache_refreshes_after_its_ttl_and_remembers_a_failure() -> None:
    calls: list[str] = []
    outcomes: list[list[ModelInfo] | BackendError] = [
        [ModelInfo(name="a", loaded=True)],
        BackendUnavailable("provider down"),
    ]

    async def fetch() -> list[ModelInfo]:
        calls.append("fetch")
        outcome = outcomes.pop(0)
        if isinstance(outcome, BackendError):
            raise outcome
        return outcome

    async def scenario() -> None:
        cache = ModelCache(ttl_s=0.05)
        assert [m.name for m in await cache.get(fetch)] == ["a"]
        assert [m.name for m in await cache.get(fetch)] == ["a"]  # cached
        await asyncio.sleep(0.06)
        # Expired: the old list is served while the refresh runs in the background...
        assert [m.name for m in await cache.get(fetch)] == ["a"]
        await asyncio.sleep(0.01)
        for _ in range(2):  # ...whose failure then stands, without asking again
            with pytest.raises(BackendUnavailable):
                await cache.get(fetch)

    asyncio.run(scenario())
    assert calls == ["fetch", "fetch"]


def test_a_slow_listing_outlives_a_caller_that_gave_up() -> None:
    """The heartbeat waits a couple of seconds for an inventory; a slower provider's listing
    must still finish, for the next heartbeat to use."""
    calls: list[str] = []

    async def slow_fetch() -> list[ModelInfo]:
        calls.append("fetch")
        await asyncio.sleep(0.1)
        return [ModelInfo(name="slow", loaded=True)]

    async def scenario() -> list[ModelInfo]:
        cache = ModelCache()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cache.get(slow_fetch), 0.02)
        await asyncio.sleep(0.15)
        return await asyncio.wait_for(cache.get(slow_fetch), 0.02)

    assert [m.name for m in asyncio.run(scenario())] == ["slow"]
    assert calls == ["fetch"]


def test_configured_models_are_served_without_asking() -> None:
    async def fetch() -> list[ModelInfo]:
        raise AssertionError("the provider must not be asked")

    cache = ModelCache(fixed=("claude-x", "claude-y"))
    models = asyncio.run(cache.get(fetch))
    assert [(m.name, m.loaded) for m in models] == [("claude-x", True), ("claude-y", True)]
