"""The error tree: which failures may move a job to another node, read off the classes."""

from __future__ import annotations

from broker.errors import (
    RETRYABLE_CODES,
    BackendAuthError,
    BackendRateLimited,
    BackendUnavailable,
    ContentBlocked,
    CorralError,
    QuotaExhausted,
    error_from_code,
)


def test_retryable_codes_are_the_retryable_classes() -> None:
    assert {
        "backend_unavailable",
        "backend_auth",
        "rate_limited",
        "quota_exhausted",
        "worker_error",
    } <= RETRYABLE_CODES
    # Asking elsewhere will not make a refused prompt, a cancel or a bad config succeed.
    assert {"content_blocked", "cancelled", "config"}.isdisjoint(RETRYABLE_CODES)


def test_a_spent_quota_is_a_rate_limit_another_route_may_not_share() -> None:
    assert issubclass(QuotaExhausted, BackendRateLimited)
    assert BackendRateLimited.retryable and QuotaExhausted.retryable


def test_a_rate_limit_carries_its_retry_after() -> None:
    error = BackendRateLimited("slow down", retry_after=12.5)
    assert (str(error), error.retry_after) == ("slow down", 12.5)


def test_codes_rebuild_their_classes_on_the_client() -> None:
    for cls in (BackendAuthError, BackendRateLimited, QuotaExhausted, ContentBlocked):
        rebuilt = error_from_code(cls.code, "why")
        assert type(rebuilt) is cls and str(rebuilt) == "why"
    assert type(error_from_code("no_such_code", "x")) is CorralError
    assert isinstance(error_from_code("backend_unavailable", "x"), BackendUnavailable)


def test_a_backends_retry_after_survives_the_trip_to_the_client() -> None:
    rebuilt = error_from_code("backend_unavailable", "overloaded", retry_after=3.0)
    assert isinstance(rebuilt, BackendUnavailable) and rebuilt.retry_after == 3.0
    assert error_from_code("rate_limited", "slow", 2.0).retry_after == 2.0  # type: ignore[attr-defined]
