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
    ├── JobError                the job ran (or was sent) and did not finish well
    │   ├── NodeLost            the serving node stopped heartbeating mid-job
    │   ├── JobCancelled        somebody cancelled it
    │   ├── JobTimeout          no event within the allowed time
    │   ├── JobInterrupted      it failed after its first token (partial text kept)
    │   └── AttemptsExhausted   it failed on every node it was tried on
    ├── ModelOpError            a pull / warm / unload / rm could not be done
    │   ├── ModelTooLarge       the model would not fit the node's free memory
    │   └── UnsupportedOperation  the backend cannot manage models
    └── BackendError            the node's LLM backend failed
        ├── BackendUnavailable  connection refused, DNS, reset before any byte
        ├── BackendTimeout      connect/read timed out
        ├── ModelNotFound       the backend says it has no such model (404)
        └── BackendProtocolError  the backend answered something we cannot parse, or an HTTP error

Backend adapters translate httpx errors into ``BackendError`` subclasses at the boundary, so
nothing above the adapter ever sees an httpx exception.
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    code = "error"


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


class JobError(CorralError):
    code = "job"


class NodeLost(JobError):
    code = "node_lost"


class JobCancelled(JobError):
    code = "cancelled"


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
    code = "backend"


class BackendUnavailable(BackendError):
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    code = "backend_timeout"


class ModelNotFound(BackendError):
    code = "model_not_found"


class BackendProtocolError(BackendError):
    code = "backend_protocol"


RETRYABLE_CODES = frozenset(
    {
        "backend_unavailable",
        "backend_timeout",
        "backend_protocol",
        "model_not_found",
        "node_lost",
        "worker_error",
    }
)
"""Failures another node may not have: a job failing so before its first token moves on."""

NODE_FAILURE_CODES = frozenset({"node_lost", "worker_error"})
"""Retryable failures of the node's worker itself, not of one of its backends: they count
against the node's circuit breaker rather than the backend's."""


_BY_CODE: dict[str, type[CorralError]] = {}


def _index(cls: type[CorralError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(CorralError)


def error_from_code(code: str, message: str) -> CorralError:
    """Rebuild the right exception class from an ``ErrorEvent``'s code on the client side."""
    return _BY_CODE.get(code, CorralError)(message)
