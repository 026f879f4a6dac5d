"""The contract between corral's controller and its node workers.

Holds settings, the Celery app factory, every queue/channel/key name, the message schemas and
the error tree. It imports neither ``worker`` nor ``controller`` and does no I/O at import time.
"""

from broker import names
from broker.celery_app import make_celery_app
from broker.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    BrokerUnavailable,
    ConfigError,
    CorralError,
    JobCancelled,
    JobError,
    JobTimeout,
    ModelNotFound,
    NodeLost,
    NoNodeAvailable,
    RoutingError,
    UnknownModel,
    UnknownNode,
    error_from_code,
)
from broker.schemas import (
    BackendInfo,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    JobAssignment,
    JobResult,
    JobSpec,
    MemoryInfo,
    ModelInfo,
    NodeInfo,
    StartedEvent,
    StreamEvent,
    Timings,
    Usage,
    parse_event,
)
from broker.settings import CorralSettings, build_settings, redacted_url

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendInfo",
    "BackendProtocolError",
    "BackendTimeout",
    "BackendUnavailable",
    "BrokerUnavailable",
    "ChatMessage",
    "ConfigError",
    "CorralError",
    "CorralSettings",
    "DeltaEvent",
    "DoneEvent",
    "ErrorEvent",
    "GenerationOptions",
    "JobAssignment",
    "JobCancelled",
    "JobError",
    "JobResult",
    "JobSpec",
    "JobTimeout",
    "MemoryInfo",
    "ModelInfo",
    "ModelNotFound",
    "NoNodeAvailable",
    "NodeInfo",
    "NodeLost",
    "RoutingError",
    "StartedEvent",
    "StreamEvent",
    "Timings",
    "UnknownModel",
    "UnknownNode",
    "Usage",
    "__version__",
    "build_settings",
    "error_from_code",
    "make_celery_app",
    "names",
    "parse_event",
    "redacted_url",
]
