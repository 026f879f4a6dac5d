"""What an HTTP client is told when corral cannot answer: a status, a message, a kind.

Both APIs share the decision (``http_error``); each writes it in its own error shape
(OpenAI's ``{"error": {"message", "type", "code"}}``, Ollama's ``{"error": "..."}``).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import (
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BrokerUnavailable,
    ConfigError,
    ContentBlocked,
    CorralError,
    JobCancelled,
    JobTimeout,
    ModelNotFound,
    NoNodeAvailable,
    QuotaExhausted,
    RequestTooLarge,
    RoutingError,
    UnknownModel,
    UnknownNode,
    UnsupportedOperation,
    UnsupportedRequest,
)

RETRY_AFTER_S = 5
"""What a 503 advises: about two heartbeats, time for a node to come (back) up."""


@dataclass
class HttpError(Exception):
    """An answer that is not a success; raised anywhere in a handler, written by the app."""

    status: int
    message: str
    kind: str = "invalid_request_error"
    """OpenAI's ``type``: invalid_request_error, authentication_error, server_error, ..."""
    code: str | None = None
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message


def bad_request(message: str, code: str | None = None) -> HttpError:
    return HttpError(400, message, code=code)


def http_error(exc: CorralError) -> HttpError:
    """The HTTP answer for a library error (its message never holds a prompt or a secret)."""
    message = str(exc) or exc.code
    match exc:
        case RequestTooLarge():
            return HttpError(413, message, code="request_too_large")
        case ConfigError():
            return HttpError(400, message, code=exc.code)
        case UnknownModel() | ModelNotFound():
            return HttpError(404, message, code="model_not_found")
        case UnknownNode():
            return HttpError(404, message, code="node_not_found")
        case NoNodeAvailable() | RoutingError():
            # Every candidate held by its provider or a configured limit: as long as that lasts.
            wait = exc.retry_after if exc.retry_after is not None else RETRY_AFTER_S
            return HttpError(503, message, "server_error", exc.code, retry_after=wait)
        case BrokerUnavailable():
            return HttpError(503, message, "server_error", exc.code, retry_after=RETRY_AFTER_S)
        case QuotaExhausted():
            return HttpError(429, message, "insufficient_quota", exc.code)
        case BackendRateLimited():
            retry = exc.retry_after if exc.retry_after is not None else RETRY_AFTER_S
            return HttpError(429, message, "rate_limit_error", exc.code, retry_after=retry)
        case ContentBlocked():
            return HttpError(400, message, code="content_filter")
        case UnsupportedRequest():
            return HttpError(400, message, code=exc.code)
        case JobTimeout() | BackendTimeout():
            return HttpError(504, message, "server_error", exc.code)
        case JobCancelled():
            return HttpError(499, message, "server_error", exc.code)
        case UnsupportedOperation():
            return HttpError(501, message, "server_error", exc.code)
        case BackendError() if exc.retry_after is not None:
            # An overloaded provider that said when to come back (a 529 with Retry-After).
            return HttpError(503, message, "server_error", exc.code, retry_after=exc.retry_after)
    return HttpError(502, message, "server_error", exc.code)
