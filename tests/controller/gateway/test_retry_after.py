"""The gateway's Retry-After comes from the provider's advice when a job's error carries it."""

from __future__ import annotations

import pytest

from broker.errors import NoNodeAvailable
from broker.schemas import ErrorEvent
from controller.gateway.errors import RETRY_AFTER_S, http_error
from controller.gateway.jobs import final_failure


def final_error(code: str, retry_after: float | None) -> ErrorEvent:
    return ErrorEvent(
        job_id="job-retry-1",
        seq=3,
        ts=0,
        code=code,
        message="the provider asked us to wait",
        final=True,
        retry_after=retry_after,
    )


@pytest.mark.parametrize(
    ("code", "retry_after", "status", "header"),
    [
        ("backend_unavailable", 7.0, 503, 7.0),  # a 529 overloaded with Retry-After
        ("rate_limited", 2.0, 429, 2.0),
        ("rate_limited", None, 429, RETRY_AFTER_S),
        ("backend_unavailable", None, 502, None),  # no advice, no header
    ],
)
def test_the_answer_waits_as_long_as_the_provider_said(
    code: str, retry_after: float | None, status: int, header: float | None
) -> None:
    error = final_failure(final_error(code, retry_after))
    assert error is not None
    answer = http_error(error)
    assert (answer.status, answer.retry_after) == (status, header)


def test_a_job_nothing_may_take_yet_waits_until_the_first_backend_reopens() -> None:
    held = NoNodeAvailable("c/claude: rate limited by its provider for 2s more")
    held.retry_after = 2.4
    assert http_error(held).retry_after == 2.4
    assert http_error(NoNodeAvailable("no node is up")).retry_after == RETRY_AFTER_S
