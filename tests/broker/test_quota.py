from __future__ import annotations

import pytest

from broker.quota import QUOTA_FRESH_S, quota_left

NOW = 1_000_000.0


def test_the_smallest_share_of_any_limit_is_what_is_left() -> None:
    openai = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "90",
        "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "10000",
    }
    assert quota_left(openai, NOW, NOW) == pytest.approx(0.25)
    anthropic = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "400",
    }
    assert quota_left(anthropic, NOW, NOW) == pytest.approx(0.05)


def test_headers_without_numbers_or_too_old_say_nothing() -> None:
    assert quota_left({}, NOW, NOW) is None
    assert quota_left({"x-ratelimit-reset-requests": "1s"}, NOW, NOW) is None
    garbled = {"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-requests": "some"}
    assert quota_left(garbled, NOW, NOW) is None
    fresh = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0"}
    assert quota_left(fresh, NOW, NOW + 1) == 0.0
    assert quota_left(fresh, NOW, NOW + QUOTA_FRESH_S + 1) is None


def test_a_share_stays_between_none_and_all() -> None:
    over = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "12"}
    assert quota_left(over, NOW, NOW) == 1.0
    zero_limit = {"x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "0"}
    assert quota_left(zero_limit, NOW, NOW) is None
