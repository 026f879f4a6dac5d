"""corral's one rooted error tree.

::

    CorralError
    ├── ConfigError             bad settings, flags or corral.yaml
    │   └── RequestTooLarge     a prompt over the cluster's size limit (refused before Redis)
    ├── BrokerUnavailable       Redis cannot be reached or refuses us
    ├── RoutingError            nothing can serve this job
    │   ├── UnknownNode        an @name that matches no node
    │   ├── UnknownModel        a model no node has
    │   └── NoNodeAvailable     matching nodes exist but none is up / fits
    │       └── PromptTooLong   the job exceeds every candidate model's context window
    ├── JobError                the job ran (or was sent) and did not finish well
    │   ├── NodeLost            the serving node stopped heartbeating mid-job
    │   ├── JobCancelled        somebody cancelled it
    │   ├── JobTimeout          no event within the allowed time
    │   ├── JobStateLost        Redis lost the job's state (restarted without persistence)
    │   ├── JobInterrupted      it failed after its first token (partial text kept)
    │   └── AttemptsExhausted   it failed on every node it was tried on
    ├── ModelOpError            a pull / warm / unload / rm could not be done
    │   ├── ModelTooLarge       the model would not fit the node's free memory
    │   └── UnsupportedOperation  the backend cannot manage models
    └── BackendError            the node's LLM backend failed
        ├── BackendUnavailable  connection refused or dropped, 503, a provider overloaded (529)
        ├── BackendTimeout      connect/read timed out
        ├── ModelNotFound       the backend says it has no such model (404)
        ├── BackendProtocolError  the backend answered something we cannot parse, or an HTTP error
        ├── BackendAuthError    the provider refused the node's API key (401/403)
        ├── BackendRateLimited  too many requests for now (429), ``retry_after`` seconds if told
        │   └── QuotaExhausted  the key's quota or budget is spent: waiting will not help
        ├── ContentBlocked      the provider refused the prompt or the answer (safety filters)
        └── UnsupportedRequest  the backend cannot take part of the request (tools, images)

Backend adapters translate httpx errors into ``BackendError`` subclasses at the boundary, so
nothing above the adapter ever sees an httpx exception.

Each class says whether it is ``retryable``: whether another node (another backend, another
key) may succeed where this one failed, so the job may move on before its first token.
``RETRYABLE_CODES`` is read off the classes; the wire carries only the code.
"""

from __future__ import annotations

from typing import ClassVar


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    """Whether another node may serve the job after this failure (before its first token)."""
    retry_after: float | None = None
    """Seconds after which the same request may succeed, when that is known (a provider's
    Retry-After, the end of a rate limit's minute)."""


class ConfigError(CorralError):
    code = "config"


class RequestTooLarge(ConfigError):
    """A prompt (with its session history) over ``max_prompt_bytes``: refused before it is sent."""

    code = "too_large"


class BrokerUnavailable(CorralError):
    code = "broker_unavailable"


class RoutingError(CorralError):
    code = "routing"


class UnknownNode(RoutingError):
    code = "unknown_node"


class UnknownModel(RoutingError):
    code = "unknown_model"


class NoNodeAvailable(RoutingError):
    code = "no_node_available"


class PromptTooLong(NoNodeAvailable):
    """The job's estimated tokens exceed the context window of every model that could serve it."""

    code = "prompt_too_long"


class JobError(CorralError):
    code = "job"


class NodeLost(JobError):
    code = "node_lost"
    retryable = True


class WorkerFailed(JobError):
    """The node's worker failed outside its backend (an unexpected error in the task)."""

    code = "worker_error"
    retryable = True


class JobCancelled(JobError):
    code = "cancelled"


class JobStateLost(JobError):
    """Redis no longer has the job's record or the events already seen: it restarted without
    persistence (or the keys expired). Nobody can follow the job to its end any more."""

    code = "state_lost"


class JobTimeout(JobError):
    code = "timeout"


class JobInterrupted(JobError):
    code = "interrupted"


class AttemptsExhausted(JobError):
    code = "attempts_exhausted"


class ModelOpError(CorralError):
    code = "model_op"


class ModelTooLarge(ModelOpError):
    code = "model_too_large"


class UnsupportedOperation(ModelOpError):
    code = "unsupported"


class BackendError(CorralError):
    """``retry_after``: the provider's advice, in seconds, on when this backend may take a
    request again (a 429's or 529's Retry-After; a spent quota's reset), if it gave one."""

    code = "backend"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    retryable = True


class BackendTimeout(BackendError):
    code = "backend_timeout"
    retryable = True


class ModelNotFound(BackendError):
    code = "model_not_found"
    retryable = True


class BackendProtocolError(BackendError):
    code = "backend_protocol"
    retryable = True


class BackendAuthError(BackendError):
    """The provider refused the key. Retryable: another node holds its own key. The message
    names where the key comes from (its environment variable), never the key."""

    code = "backend_auth"
    retryable = True


class BackendRateLimited(BackendError):
    """Too many requests for this key now; ``retry_after`` is the provider's advice, seconds."""

    code = "rate_limited"
    retryable = True

    def __init__(
        self, message: str, retry_after: float | None = None, limit: str | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit = limit
        """Set when corral's own configured limit refused the call (its scope, ``anthropic``
        or ``anthropic|MODEL``) rather than the provider."""


class QuotaExhausted(BackendRateLimited):
    """The key's quota (daily requests, credit) is spent: not a wait-and-retry failure on this
    backend (its breaker holds until the reset), but another route of the model, or the next
    tier, may serve the job, so a job failing so before its first token moves on."""

    code = "quota_exhausted"
    retryable = True


class ContentBlocked(BackendError):
    """The provider's safety filter stopped the prompt or the answer: asking another node the
    same thing is unlikely to help, so the job ends here with the provider's reason."""

    code = "content_blocked"


class UnsupportedRequest(BackendError):
    """The backend cannot pass on part of the request (tools or images to an adapter without
    them): refused instead of silently dropped. Another node's backend may take it."""

    code = "unsupported_request"
    retryable = True


NODE_FAILURE_CODES = frozenset({"node_lost", "worker_error"})
"""Retryable failures of the node's worker itself, not of one of its backends: they count
against the node's circuit breaker rather than the backend's."""


_BY_CODE: dict[str, type[CorralError]] = {}


def _index(cls: type[CorralError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(CorralError)

RETRYABLE_CODES = frozenset(code for code, cls in _BY_CODE.items() if cls.retryable)
"""Failures another node may not have: a job failing so before its first token moves on."""


def error_from_code(code: str, message: str, retry_after: float | None = None) -> CorralError:
    """Rebuild the right exception class from an ``ErrorEvent``'s code on the client side;
    a backend's error keeps the event's ``retry_after``."""
    cls = _BY_CODE.get(code, CorralError)
    if issubclass(cls, BackendError):
        return cls(message, retry_after=retry_after)
    return cls(message)
