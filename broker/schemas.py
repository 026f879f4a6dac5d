"""The typed, versioned messages that cross between controller and worker.

Every model is frozen with ``extra="forbid"``: a message with an unknown field is rejected at
the boundary instead of being half-understood. Messages travel as
``model.model_dump(mode="json")`` (Celery task arguments) or ``model_dump_json()`` (Redis).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Role = Literal["system", "user", "assistant"]
Priority = Literal["interactive", "batch"]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    """The schema version; a reader refuses a message of another."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str


class GenerationOptions(BaseModel):
    """The sampling options corral passes through to every backend kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class JobSpec(Message):
    """What a user asked for: the prompt and the hints the router uses."""

    job_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    route: Name | None = None
    model: str | None = Field(default=None, min_length=1)
    tags: frozenset[str] = frozenset()
    priority: Priority = "interactive"
    session: str | None = None
    options: GenerationOptions = GenerationOptions()
    created_at: float


class JobAssignment(Message):
    """The Celery task argument: a job plus the router's choice of backend and model on the node."""

    spec: JobSpec
    node: Name
    backend: Name
    model: str = Field(min_length=1)

    def argsrepr(self) -> str:
        """What Flower and the worker log show instead of the prompt."""
        route = self.spec.route or "-"
        return f"job={self.spec.job_id} route={route} node={self.node} model={self.model}"


# --- stream events -------------------------------------------------------------------------


class _Event(Message):
    job_id: str
    seq: int = Field(ge=0)
    ts: float


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    node: str
    backend: str
    model: str


class DeltaEvent(_Event):
    type: Literal["delta"] = "delta"
    text: str


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int | None = None
    completion_tokens: int = 0


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    queued_ms: float
    """From the controller creating the job to the worker starting it."""
    first_token_ms: float | None
    """From the worker starting the job to the first token."""
    total_ms: float
    """From the controller creating the job to the last token."""


class JobResult(Message):
    """The final outcome, kept after the stream ends."""

    job_id: str
    status: Literal["ok", "error", "cancelled"]
    node: str
    backend: str
    model: str
    text: str
    finish_reason: str | None = None
    usage: Usage = Usage()
    timings: Timings
    error_code: str | None = None
    error_message: str | None = None


class DoneEvent(_Event):
    type: Literal["done"] = "done"
    result: JobResult


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    node: str | None = None


StreamEvent = Annotated[
    StartedEvent | DeltaEvent | DoneEvent | ErrorEvent, Field(discriminator="type")
]
STREAM_EVENT: TypeAdapter[StartedEvent | DeltaEvent | DoneEvent | ErrorEvent] = TypeAdapter(
    StreamEvent
)
TERMINAL_EVENT_TYPES = frozenset({"done", "error"})


def parse_event(raw: str | bytes) -> StartedEvent | DeltaEvent | DoneEvent | ErrorEvent:
    """Parse one StreamEvent from its JSON form; raises pydantic.ValidationError if malformed."""
    return STREAM_EVENT.validate_json(raw)


# --- cluster state -------------------------------------------------------------------------


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    loaded: bool = False
    size_bytes: int | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None


class BackendInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    kind: Literal["ollama", "openai", "simulated"]
    url: str | None = None
    """Scheme, host and port only: never credentials or query strings."""
    healthy: bool
    error: str | None = None
    capacity: int = Field(ge=1)
    models: tuple[ModelInfo, ...] = ()


class MemoryInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    total_bytes: int
    available_bytes: int


class NodeInfo(Message):
    """One worker's heartbeat: who it is, what it can run, how busy it is."""

    name: Name
    version: str
    tags: frozenset[str] = frozenset()
    backends: tuple[BackendInfo, ...]
    memory: MemoryInfo | None = None
    in_flight: int = Field(ge=0)
    capacity: int = Field(ge=1)
    heartbeat_interval_s: float = Field(gt=0)
    started_at: float
    sent_at: float

    def model_names(self) -> set[str]:
        return {m.name for b in self.backends for m in b.models}
