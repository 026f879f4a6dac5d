"""Turning a backend's HTTP failures into the ``broker.errors.BackendError`` tree, secret-free.

Shared by the HTTP adapters (``ollama``, ``openai_compat``): each names itself in ``where``
(``"ollama backend 'gpu0' at http://host:11434"``), reads its own error bodies, and leaves the
rest here: which httpx exceptions to catch and what they become, the ``HTTP <status>`` and
model-not-found errors, and the clipping and scrubbing that keep a backend's words short and
its base URL's credentials (and any API key) out of every message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx

from broker.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
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
    """An adapter's reading of an error response."""

    message: str
    """Clipped and scrubbed (``error_text``)."""
    model_missing: bool
    """The backend says the requested model does not exist (as opposed to a wrong URL)."""


async def check_status(
    response: httpx.Response,
    *,
    backend: str,
    where: str,
    model: str | None,
    read_error: Callable[[httpx.Response], ErrorReport],
) -> None:
    """Return if ``response`` succeeded; otherwise read its body and raise.

    ``ModelNotFound`` when a ``model`` was asked for and ``read_error`` says it is missing,
    ``BackendProtocolError`` naming the status otherwise.
    """
    if response.status_code < 400:
        return
    await response.aread()
    report = read_error(response)
    if model is not None and report.model_missing:
        raise ModelNotFound(f"model {model!r} not found on backend {backend!r}")
    raise BackendProtocolError(f"{where} answered HTTP {response.status_code}: {report.message}")


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
