"""Configured rate limits: read from corral.yaml, counted in a real Redis by the workers'
limiter, read back by the router's check."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from broker import names
from broker.errors import BackendRateLimited, ConfigError
from broker.ratelimits import (
    ProviderLimits,
    RateLimit,
    estimate_prompt_tokens,
    limit_scopes,
    over_limit,
    parse_counters,
)
from broker.schemas import ChatMessage, JobResult, Timings, Usage
from broker.settings import build_settings
from worker.limiter import Admission, ProviderLimiter

PROMPT = (ChatMessage(role="user", content="x" * 400),)  # about 104 tokens by the estimate


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CORRAL_CONFIG", "CORRAL_LIMITS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_limits_are_read_from_corral_yaml_per_provider_and_model(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text(
        "limits:\n  anthropic:\n    rpm: 50\n    tpm: 40000\n"
        "    models:\n      claude-opus-4: {rpm: 5}\n"
    )
    limits = build_settings().limits
    assert limits == {
        "anthropic": ProviderLimits(rpm=50, tpm=40000, models={"claude-opus-4": RateLimit(rpm=5)})
    }
    assert [s.field for s in limit_scopes(limits, "anthropic", "claude-opus-4")] == [
        "anthropic",
        "anthropic|claude-opus-4",
    ]
    assert [s.field for s in limit_scopes(limits, "anthropic", "claude-haiku")] == ["anthropic"]
    assert limit_scopes(limits, "google", "gemini-2.5-pro") == []


def test_an_unknown_kind_or_a_zero_limit_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text("limits:\n  claude:\n    rpm: 5\n")
    with pytest.raises(ConfigError, match=r"unknown backend kinds claude \(known: anthropic"):
        build_settings()
    (tmp_path / "corral.yaml").write_text("limits:\n  anthropic:\n    rpm: 0\n")
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        build_settings()
    (tmp_path / "corral.yaml").write_text("limits:\n  anthropic:\n    rps: 5\n")
    with pytest.raises(ConfigError, match="rps"):
        build_settings()


def test_the_environment_may_set_them_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_LIMITS", '{"mistral": {"tpm": 1000}}')
    assert build_settings().limits == {"mistral": ProviderLimits(tpm=1000)}


def test_the_prompt_estimate_is_about_four_characters_a_token() -> None:
    assert estimate_prompt_tokens(PROMPT) == 104
    assert estimate_prompt_tokens(()) == 0


def _result(prompt_tokens: int | None, completion_tokens: int) -> JobResult:
    return JobResult(
        job_id="job-00000001",
        status="ok",
        node="n",
        backend="anthropic",
        model="m",
        text="",
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        timings=Timings(queued_ms=0, first_token_ms=None, total_ms=0),
    )


def _run(broker_url: str, limits: dict[str, ProviderLimits], steps: object) -> object:
    async def main() -> object:
        redis = Redis.from_url(broker_url)
        try:
            return await steps(ProviderLimiter(redis, limits), redis)  # type: ignore[operator]
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_two_limiters_share_the_count_and_the_third_call_is_refused(broker_url: str) -> None:
    limits = {"anthropic": ProviderLimits(rpm=2)}

    async def steps(first: ProviderLimiter, redis: Redis) -> tuple[object, ...]:
        second = ProviderLimiter(redis, limits)
        a = await first.admit("anthropic", "m", PROMPT)
        b = await second.admit("anthropic", "m", PROMPT)
        with pytest.raises(BackendRateLimited) as refused:
            await first.admit("anthropic", "m", PROMPT)
        unlimited = await first.admit("mistral", "m", PROMPT)
        ttl = await redis.ttl(names.RATE_COUNTERS_HASH)
        return a, b, refused.value, unlimited, ttl

    a, b, refused, unlimited, ttl = _run(broker_url, limits, steps)  # type: ignore[misc]
    assert isinstance(a, Admission) and isinstance(b, Admission)
    assert isinstance(refused, BackendRateLimited)
    assert refused.code == "rate_limited"
    assert "anthropic is at its configured rpm of 2" in str(refused)
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    assert unlimited is None  # no limit for that kind: nothing counted
    assert 0 < ttl <= 120  # the counters expire when nobody calls


def test_tokens_count_the_estimate_then_the_real_usage(broker_url: str) -> None:
    limits = {"openai-cloud": ProviderLimits(tpm=300)}

    async def steps(limiter: ProviderLimiter, redis: Redis) -> tuple[object, ...]:
        first = await limiter.admit("openai-cloud", "gpt", PROMPT)
        assert first is not None
        estimated = parse_counters(await redis.hgetall(names.RATE_COUNTERS_HASH))
        await limiter.settle(first, _result(prompt_tokens=100, completion_tokens=150))
        settled = parse_counters(await redis.hgetall(names.RATE_COUNTERS_HASH))
        # 250 of 300 used: another ~104-token prompt no longer fits.
        with pytest.raises(BackendRateLimited, match="configured tpm of 300"):
            await limiter.admit("openai-cloud", "gpt", PROMPT)
        return estimated, settled

    estimated, settled = _run(broker_url, limits, steps)  # type: ignore[misc]
    assert estimated["openai-cloud"].tokens == 104  # type: ignore[index]
    assert settled["openai-cloud"].tokens == 250  # type: ignore[index]
    assert settled["openai-cloud"].requests == 1  # type: ignore[index]


def test_a_model_limit_refuses_without_counting_the_provider(broker_url: str) -> None:
    limits = {"anthropic": ProviderLimits(rpm=10, models={"opus": RateLimit(rpm=1)})}

    async def steps(limiter: ProviderLimiter, redis: Redis) -> object:
        await limiter.admit("anthropic", "opus", PROMPT)
        with pytest.raises(BackendRateLimited, match="anthropic model opus is at its"):
            await limiter.admit("anthropic", "opus", PROMPT)
        await limiter.admit("anthropic", "sonnet", PROMPT)  # other models still go
        return parse_counters(await redis.hgetall(names.RATE_COUNTERS_HASH))

    counters = _run(broker_url, limits, steps)
    assert counters["anthropic"].requests == 2  # type: ignore[index]
    assert counters["anthropic|opus"].requests == 1  # type: ignore[index]


def test_the_routers_check_reads_the_same_counts() -> None:
    scopes = limit_scopes({"anthropic": ProviderLimits(rpm=2)}, "anthropic", "m")
    now = 600.0 * 60 + 15  # 15 s into a minute
    counters = parse_counters({b"anthropic": b"600|2|40"})
    over = over_limit(scopes, counters, now)
    assert over is not None and over[1] == "rpm" and over[2] == pytest.approx(45)
    assert over_limit(scopes, parse_counters({b"anthropic": b"600|1|40"}), now) is None
    # Last minute's count does not hold this minute back.
    assert over_limit(scopes, parse_counters({b"anthropic": b"599|9|40"}), now) is None
