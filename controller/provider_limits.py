"""What each cloud backend's provider last said about its rate limits, read for the CLI.

Workers copy the ``x-ratelimit-*`` (OpenAI and compatible) and ``anthropic-ratelimit-*``
headers of their providers' answers into Redis (``worker.provider_limits``); this reads them
back and says them in a few words: ``requests 49/50 left (reset 1s); tokens 39000/40000 left``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from redis import Redis

from broker import names
from broker.quota import QUOTA_KINDS, header_value
from broker.ratelimits import HEADERS_UPDATED_AT_FIELD

__all__ = ["ProviderHeaders", "read_provider_headers"]


@dataclass(frozen=True, slots=True)
class ProviderHeaders:
    """One backend's last rate-limit headers, by lower-case name."""

    headers: Mapping[str, str]
    updated_at: float | None

    def summary(self) -> str:
        """``requests 49/50 left (reset 1s); tokens 39000/40000 left (reset 6ms)``."""
        parts = []
        for what in QUOTA_KINDS:
            remaining = header_value(self.headers, what, "remaining")
            limit = header_value(self.headers, what, "limit")
            if remaining is None:
                continue
            of = f"/{limit}" if limit is not None else ""
            reset = header_value(self.headers, what, "reset")
            when = f" (reset {reset})" if reset is not None else ""
            parts.append(f"{what.replace('-', ' ')} {remaining}{of} left{when}")
        return "; ".join(parts)


def read_provider_headers(
    redis: Redis, targets: Iterable[tuple[str, str]]
) -> dict[str, ProviderHeaders]:
    """``node/backend`` -> its provider's last headers, for the (node, backend) pairs given
    that have any (one round trip)."""
    pairs = list(targets)
    if not pairs:
        return {}
    pipe = redis.pipeline(transaction=False)
    for node, backend in pairs:
        pipe.hgetall(names.provider_limits_key(node, backend))
    found: dict[str, ProviderHeaders] = {}
    for (node, backend), raw in zip(pairs, pipe.execute(), strict=True):
        if not raw:
            continue
        headers = {_text(k): _text(v) for k, v in raw.items()}
        stamp = headers.pop(HEADERS_UPDATED_AT_FIELD, None)
        try:
            updated_at = float(stamp) if stamp is not None else None
        except ValueError:
            updated_at = None
        found[f"{node}/{backend}"] = ProviderHeaders(headers, updated_at)
    return found


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
