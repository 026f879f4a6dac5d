"""Turning a backend's HTTP failures into the ``broker.errors.BackendError`` tree, secret-free.

The one place every HTTP adapter (``ollama``, ``openai_compat``, ``anthropic``, ``google``)
maps failures: each names itself in ``where`` (``"ollama backend 'gpu0' at http://host:11434"``),
reads its own error bodies into an ``ErrorReport``, and leaves the rest to ``HttpErrors``:
which httpx exceptions to catch and what they become; what 401/403 (a refused key), 429 (a
rate limit with its Retry-After, or an exhausted quota), 402 (credit spent), 404 (a missing
model), 503/529 (an overloaded server) and any other status mean; and the clipping and
scrubbing that keep a backend's words short and its base URL's credentials (and any API key)
out of every message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx

from broker.errors import (
    BackendAuthError,
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
    QuotaExhausted,
)

MAX_DETAIL = 300
"""Longest piece of a backend's own words we copy into an error message."""

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.StreamError,
)
"""What an httpx call may raise; ``except TRANSPORT_ERRORS`` and hand it to ``transport_error``."""


def clip(text: str) -> str:
    """``text`` on one line, cut to ``MAX_DETAIL`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def url_secrets(url: str) -> tuple[str, ...]:
    """The parts of ``url`` that must never reach a message: userinfo, query, password.

    httpx rarely quotes a URL in its errors, but a proxy or a future version might: scrubbing
    these is cheap insurance. Very short passwords are left out, since replacing "ab" would
    mangle every message while hiding nothing an attacker could not guess.
    """
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    candidates = (f"{userinfo}@" if userinfo else "", parts.query, parts.password or "")
    return tuple(c for c in candidates if len(c) >= 4)


class Scrubber:
    """Replaces each of a backend's secrets with ``***`` in the text it is given.

    Longest first, so a secret that contains another is hidden whole. Empty strings are
    ignored (replacing one would put ``***`` between every character).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = dict.fromkeys(s for s in secrets if s)
        self._secrets = tuple(sorted(unique, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def detail(self, text: str) -> str:
        """A backend's own words, clipped and scrubbed, ready for an error message."""
        return self(clip(text))


def error_text(response: httpx.Response, message: str | None, scrub: Scrubber) -> str:
    """What an error response says: ``message`` (read from its body by the adapter) or else the
    start of the body, clipped and scrubbed; the reason phrase if that leaves nothing."""
    text = message if message is not None else response.text
    return scrub.detail(text) or response.reason_phrase


class ErrorReport(NamedTuple):
    """An adapter's reading of an error response (or of an error event in a stream)."""

    message: str
    """Clipped and scrubbed (``error_text``)."""
    model_missing: bool = False
    """The backend says the requested model does not exist (as opposed to a wrong URL)."""
    quota_exhausted: bool = False
    """A 429 that waiting will not cure: the key's quota or credit is spent."""
    auth_failed: bool = False
    """The body says the key is bad whatever the status (Gemini answers 400 API_KEY_INVALID)."""
    retry_after: float | None = None
    """Seconds to wait, when the body says so (Gemini's RetryInfo) rather than a header."""


OVERLOADED_STATUSES = frozenset({502, 503, 504, 529})
"""Gateway errors, "service unavailable" and Anthropic's 529 "overloaded": the server is there
but cannot take the request now, which another node may."""


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The ``Retry-After`` advice in seconds (a number or an HTTP date), or None."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def reset_seconds(value: str) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` duration (``1s``, ``6m0s``, ``120ms``) in seconds."""
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def spent_limit_reset(headers: httpx.Headers) -> float | None:
    """For a 429 without Retry-After: when the OpenAI-style limit at zero refills, from its
    ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*`` headers; None if none is at zero."""
    waits = [
        reset_seconds(headers.get(f"x-ratelimit-reset-{what}", ""))
        for what in ("requests", "tokens")
        if headers.get(f"x-ratelimit-remaining-{what}") == "0"
    ]
    known = [w for w in waits if w is not None]
    return max(known) if known else None


class HttpErrors:
    """One adapter's translation of httpx exceptions and HTTP errors into ``BackendError``.

    ``where`` names the backend in messages (``"ollama backend 'gpu0' at http://host:11434"``);
    ``read_error`` is the adapter's reading of its server's error bodies; ``key_source`` says
    where the API key comes from (``"ANTHROPIC_API_KEY"``), for the message of a refused key.
    """

    def __init__(
        self,
        *,
        backend: str,
        where: str,
        scrub: Scrubber,
        read_error: Callable[[httpx.Response], ErrorReport],
        key_source: str | None = None,
    ) -> None:
        self.backend = backend
        self.where = where
        self.scrub = scrub
        self._read_error = read_error
        self._key_source = key_source

    @contextmanager
    def translating(self) -> Iterator[None]:
        """Turn any httpx exception raised inside the block into its ``BackendError``."""
        try:
            yield
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.where, self.scrub) from None

    async def check(self, response: httpx.Response, model: str | None) -> None:
        """Return if ``response`` succeeded; otherwise read its body and raise its error."""
        if response.status_code < 400:
            return
        await response.aread()
        report = self._read_error(response)
        retry_after = retry_after_seconds(response.headers)
        if retry_after is None and response.status_code == 429:
            retry_after = spent_limit_reset(response.headers)
        raise self.for_status(
            response.status_code,
            report,
            model,
            retry_after if retry_after is not None else report.retry_after,
        )

    def for_status(
        self,
        status: int,
        report: ErrorReport,
        model: str | None,
        retry_after: float | None = None,
    ) -> BackendError:
        """The error an HTTP ``status`` (or a stream's error event of that meaning) stands for."""
        if status in (401, 403) or report.auth_failed:
            source = f"; check {self._key_source}" if self._key_source else ""
            return BackendAuthError(
                f"{self.where} refused the API key (HTTP {status}): {report.message}{source}"
            )
        if status == 402:
            # Payment Required: DeepSeek's "Insufficient Balance" (and any billing proxy's).
            return QuotaExhausted(f"{self.where} says the key's credit is spent: {report.message}")
        if status == 429:
            if report.quota_exhausted or (retry_after is None and _spend_limit(report.message)):
                return QuotaExhausted(
                    f"{self.where} says the key's quota is exhausted: {report.message}",
                    retry_after=retry_after,
                )
            wait = f"; retry after {retry_after:g}s" if retry_after is not None else ""
            return BackendRateLimited(
                f"{self.where} is rate limiting this key (HTTP 429): {report.message}{wait}",
                retry_after=retry_after,
            )
        if model is not None and report.model_missing:
            return ModelNotFound(f"model {model!r} not found on backend {self.backend!r}")
        if status in OVERLOADED_STATUSES:
            return BackendUnavailable(
                f"{self.where} cannot take the request now (HTTP {status}): {report.message}",
                retry_after=retry_after,
            )
        return BackendProtocolError(f"{self.where} answered HTTP {status}: {report.message}")

    def in_stream(self, status: int, report: ErrorReport, model: str | None) -> BackendError:
        """An error event after the 200 header, given the HTTP status its type stands for.

        What the status says about the key, the rate or the server's load holds mid-stream
        too; anything else is the server failing mid-answer.
        """
        if status in (401, 403, 429) or status in OVERLOADED_STATUSES or report.auth_failed:
            return self.for_status(status, report, model, report.retry_after)
        if model is not None and report.model_missing:
            return self.for_status(status, report, model)
        return self.mid_stream(report.message)

    def mid_stream(self, message: str) -> BackendProtocolError:
        """A failure the server reported after its 200 header."""
        return BackendProtocolError(f"{self.where} failed mid-stream: {self.scrub.detail(message)}")

    def bad_payload(self, what: str, payload: str) -> BackendProtocolError:
        """Something in the body that is not what the protocol says it should be."""
        return BackendProtocolError(f"{self.where} sent {what}: {self.scrub.detail(payload)!r}")


_SPEND_WORDS = ("spend limit", "spending limit", "usage limit")
"""Narrow on purpose: a plain rate limit's message may mention billing (OpenAI's used to point
at the billing page), and taking one for a spent quota shuts the backend for an hour."""


def _spend_limit(message: str) -> bool:
    """A 429 without Retry-After that speaks of a spend or usage limit, which waiting a few
    seconds does not lift (a plain rate limit says when to come back)."""
    lowered = message.lower()
    return any(word in lowered for word in _SPEND_WORDS)


def transport_error(exc: Exception, where: str, scrub: Scrubber) -> BackendError:
    """The ``BackendError`` for an httpx exception (one of ``TRANSPORT_ERRORS``)."""
    reason = scrub.detail(str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{where} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError | httpx.ProxyError):
        return BackendUnavailable(f"cannot connect to {where}: {reason}")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return BackendUnavailable(f"connection to {where} dropped: {reason}")
    return BackendProtocolError(f"{where}: {type(exc).__name__}: {reason}")
