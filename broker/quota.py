"""How much of a provider's quota is left, read from the rate-limit headers of its answers.

OpenAI and the APIs that copy it send ``x-ratelimit-remaining-requests`` beside
``x-ratelimit-limit-requests`` (and the same for tokens); Anthropic sends
``anthropic-ratelimit-requests-remaining`` and ``-limit`` (and input/output tokens). A worker
reduces the last set it saw to one number, the smallest share left of any limit, and sends it
with its load, so the router can put the route with the most headroom first within a tier.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["QUOTA_FRESH_S", "QUOTA_KINDS", "header_value", "quota_left"]

QUOTA_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")

QUOTA_FRESH_S = 60.0
"""Headers older than this say nothing about the quota now: providers' request and token
windows are a minute, so a share read earlier may have been refilled since."""


def header_value(headers: Mapping[str, str], kind: str, part: str) -> str | None:
    """One rate-limit header by what it counts (``requests``) and which number (``remaining``,
    ``limit``, ``reset``), in either provider's naming; names lower-case."""
    return headers.get(f"x-ratelimit-{part}-{kind}") or headers.get(
        f"anthropic-ratelimit-{kind}-{part}"
    )


def quota_left(
    headers: Mapping[str, str], updated_at: float, now: float, fresh_s: float = QUOTA_FRESH_S
) -> float | None:
    """The smallest share (0 to 1) left of any limit the headers give; None when they give
    none, or are older than ``fresh_s``."""
    if not headers or now - updated_at > fresh_s:
        return None
    shares: list[float] = []
    for kind in QUOTA_KINDS:
        remaining, limit = (
            header_value(headers, kind, "remaining"),
            header_value(headers, kind, "limit"),
        )
        try:
            left, of = float(remaining or ""), float(limit or "")
        except ValueError:
            continue  # absent or not a number: that limit says nothing
        if of > 0:
            shares.append(min(1.0, max(0.0, left / of)))
    return min(shares) if shares else None
