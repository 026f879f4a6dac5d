"""What the cloud adapters share: a cached model list and the provider's rate-limit headers.

A provider's catalogue changes rarely and every listing counts against the key's limits, so
the heartbeat (every few seconds) reads a cached copy, refreshed every ``ttl_s`` in the
background. A failed listing is remembered for ``RETRY_S`` instead of being retried on every
beat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from broker.errors import BackendError
from broker.schemas import ModelInfo

__all__ = ["DEFAULT_MODELS_TTL_S", "ModelCache", "RateLimits"]

log = logging.getLogger(__name__)

DEFAULT_MODELS_TTL_S = 3600.0
RETRY_S = 30.0
"""After a failed listing, how long the error stands before the provider is asked again."""


class ModelCache:
    """A provider's model list, fetched at most once per ``ttl_s``.

    The listing runs as its own task, shielded from the caller: the heartbeat gives up on a
    slow inventory after a couple of seconds, and the listing must not be cancelled with it
    (it would then never finish); the next heartbeat picks up its answer. Once a list is
    known, an expired one is still served while the refresh runs. ``fixed`` (from the
    configuration) replaces the listing altogether: the provider is then never asked, which
    also suits a key allowed to call only some models.
    """

    def __init__(self, ttl_s: float = DEFAULT_MODELS_TTL_S, fixed: Sequence[str] = ()) -> None:
        self._ttl_s = ttl_s
        self._fixed = [ModelInfo(name=name, loaded=True) for name in fixed]
        self._models: list[ModelInfo] | None = None
        self._fresh_until = 0.0
        self._error: BackendError | None = None
        self._retry_at = 0.0
        self._listing: asyncio.Task[list[ModelInfo]] | None = None
        self.fetches = 0
        """How many times the provider was asked (for tests and the curious)."""

    async def get(self, fetch: Callable[[], Awaitable[list[ModelInfo]]]) -> list[ModelInfo]:
        if self._fixed:
            return list(self._fixed)
        now = time.monotonic()
        if self._models is not None and now < self._fresh_until:
            return list(self._models)
        if self._error is not None and now < self._retry_at:
            raise self._error
        listing = self._listing
        if listing is None:
            self.fetches += 1
            listing = self._listing = asyncio.ensure_future(self._list(fetch))
            listing.add_done_callback(_retrieve)
        if self._models is not None:
            return list(self._models)  # stale, while the refresh runs
        return list(await asyncio.shield(listing))

    async def _list(self, fetch: Callable[[], Awaitable[list[ModelInfo]]]) -> list[ModelInfo]:
        try:
            models = await fetch()
        except BackendError as exc:
            self._error, self._retry_at = exc, time.monotonic() + RETRY_S
            raise
        finally:
            self._listing = None
        self._models, self._fresh_until, self._error = models, time.monotonic() + self._ttl_s, None
        return models


def _retrieve(task: asyncio.Task[list[ModelInfo]]) -> None:
    """Read a finished listing's outcome, so a failed background refresh (already kept as
    ``_error``) is not reported again as an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()


class RateLimits:
    """The last rate-limit headers a provider sent (``x-ratelimit-remaining-requests`` and the
    like), kept per header name; the values are counts and times, never secrets."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._prefixes = prefixes
        self.latest: dict[str, str] = {}
        self.updates = 0
        """How many answers brought headers: the heartbeat republishes when it changes."""
        self.updated_at = 0.0
        """When the last of them came (epoch seconds)."""

    def record(self, response: httpx.Response) -> None:
        seen = {
            name.lower(): value
            for name, value in response.headers.items()
            if name.lower().startswith(self._prefixes)
        }
        if seen:
            self.latest.update(seen)
            self.updates += 1
            self.updated_at = time.time()
            log.debug("rate limits now %s", seen)
