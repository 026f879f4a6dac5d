"""The typed, versioned messages that cross between controller and worker.

Every model is frozen with ``extra="forbid"``: a message with an unknown field is rejected at
the boundary instead of being half-understood. Messages travel as
``model.model_dump(mode="json")`` (Celery task arguments) or ``model_dump_json()`` (Redis).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

Role = Literal["system", "user", "assistant"]
Priority = Literal["interactive", "batch"]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


SCHEMA_VERSION = 2
"""The wire schema every message carries as ``v`` (also written by the Lua scripts that build
events inside Redis)."""


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[2] = 2
    """The schema version; a reader refuses a message of another.

    2: ``JobSpec.route`` (a pinned node) became ``JobSpec.node``, freeing "route" for named
    routes.
    """


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
    node: Name | None = None
    """Run on this node only (``@name`` when the name is a node, or a route's serving node)."""
    route: Name | None = None
    """The named route ``@name`` resolved to (its node and model are ``node`` and ``model``);
    for the record (Flower, logs): never a URL or a key."""
    model: str | None = Field(default=None, min_length=1)
    tags: frozenset[str] = frozenset()
    priority: Priority = "interactive"
    session: str | None = Field(default=None, max_length=128)
    options: GenerationOptions = GenerationOptions()
    created_at: float
    max_attempts: int = Field(default=3, ge=1, le=10)
    """How many nodes may be tried in all: a failure before the first token moves the job on."""
    retry_partial: bool = False
    """Also restart the job elsewhere when it fails after its first token (the text restarts)."""
    first_token_timeout_s: float | None = Field(default=None, gt=0)
    """Give up on a backend that has not produced a token in this long (model load included)."""


class JobAssignment(Message):
    """The Celery task argument: a job plus the router's choice of backend and model on the node."""

    spec: JobSpec
    node: Name
    backend: Name
    model: str = Field(min_length=1)
    attempt: int = Field(default=1, ge=1)
    """Which try this is; only the attempt the job's lease authorises may stream."""

    def argsrepr(self) -> str:
        """What Flower and the worker log show instead of the prompt."""
        route = f" route={self.spec.route}" if self.spec.route else ""
        return (
            f"job={self.spec.job_id}{route} node={self.node} model={self.model} "
            f"attempt={self.attempt}"
        )


ModelOpKind = Literal["pull", "warm", "unload", "rm"]


class ModelOpRequest(Message):
    """A model lifecycle operation for one node's backend, sent to that node's queue.

    Its progress travels like a job's events (on the channel and log of ``op_id``).
    """

    op_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")
    node: Name
    backend: Name | None = None
    """None: the node's first backend that can manage models."""
    op: ModelOpKind
    model: str = Field(min_length=1, max_length=256)
    force: bool = False
    """Go ahead even if the model looks too big for the node's free memory."""
    keep_alive: str | None = Field(default=None, max_length=32)
    """For ``warm``: how long the backend keeps it loaded (Ollama syntax: "30m", "-1")."""
    created_at: float

    def argsrepr(self) -> str:
        return f"op={self.op} model={self.model} node={self.node} id={self.op_id}"


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
    attempt: int = 1
    instance: str | None = None
    """The worker process serving it: a restarted worker has a new one."""


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
    """An attempt failed. ``final``: the job ends here; otherwise a ``rerouted`` event follows
    (written by the controller that owns the job) or a final error if nothing else can serve it."""

    type: Literal["error"] = "error"
    code: str
    message: str
    node: str | None = None
    attempt: int = 1
    final: bool = True
    retry_after: float | None = Field(default=None, ge=0)
    """Seconds until the backend may take a request again, when its provider said so (a 429's
    or 529's Retry-After) or corral's own rate limit knows (the end of its minute)."""
    limit: str | None = Field(default=None, max_length=200)
    """The configured rate limit that kept the call from being made (``anthropic``,
    ``anthropic|MODEL``): corral's own refusal, not the provider's, so no breaker opens."""


class InterruptedEvent(_Event):
    """An attempt failed after its first token: what it had produced is in ``partial_text``."""

    type: Literal["interrupted"] = "interrupted"
    code: str
    message: str
    node: str | None
    attempt: int
    partial_text: str
    final: bool = True


class ReroutedEvent(_Event):
    """The controller moved the job to another node; a new ``started`` event follows."""

    type: Literal["rerouted"] = "rerouted"
    attempt: int
    """The new attempt's number."""
    from_node: str | None
    to_node: str
    reason: str


class ProgressEvent(_Event):
    """A step of a model operation (a pull's download, a load)."""

    type: Literal["progress"] = "progress"
    status: str
    completed: int | None = None
    total: int | None = None


AnyStreamEvent = (
    StartedEvent
    | DeltaEvent
    | DoneEvent
    | ErrorEvent
    | InterruptedEvent
    | ReroutedEvent
    | ProgressEvent
)
StreamEvent = Annotated[AnyStreamEvent, Field(discriminator="type")]
STREAM_EVENT: TypeAdapter[AnyStreamEvent] = TypeAdapter(StreamEvent)


def is_terminal(event: AnyStreamEvent) -> bool:
    """Whether nothing follows this event in its job's stream."""
    if isinstance(event, DoneEvent):
        return True
    if isinstance(event, ErrorEvent | InterruptedEvent):
        return event.final
    return False


def parse_event(raw: str | bytes) -> AnyStreamEvent:
    """Parse one StreamEvent from its JSON form; raises pydantic.ValidationError if malformed."""
    return STREAM_EVENT.validate_json(raw)


# --- cluster state -------------------------------------------------------------------------


def canonical_model_name(name: str) -> str:
    """Ollama's reading of a model name, which corral uses everywhere: no tag means ``:latest``."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def same_model(a: str, b: str) -> bool:
    """Whether two names mean the same model (``llama3`` is ``llama3:latest``)."""
    return a == b or canonical_model_name(a) == canonical_model_name(b)


Capability = Literal["chat", "embed", "vision", "tools", "thinking", "insert"]


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    loaded: bool = False
    size_bytes: int | None = None
    """On disk (Ollama /api/tags)."""
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    capabilities: frozenset[Capability] = frozenset()
    """Empty when the backend does not say; the router then assumes a chat model."""
    loaded_until: float | None = None
    """Epoch seconds the backend will unload it (None: not loaded, or kept forever)."""
    loaded_bytes: int | None = None
    """Memory it takes while loaded; ``loaded_vram_bytes`` of it on the GPU."""
    loaded_vram_bytes: int | None = None

    def serves_chat(self) -> bool:
        return not self.capabilities or "chat" in self.capabilities


BackendKind = Literal[
    "ollama",
    "openai",
    "simulated",
    "anthropic",
    "google",
    "openai-cloud",
    "mistral",
    "deepseek",
]
"""Every kind of backend a worker can front: its transport and, for a cloud, the provider.

``openai`` is any OpenAI-compatible server on the network (llama.cpp, vLLM, LM Studio);
``openai-cloud``, ``mistral`` and ``deepseek`` are the providers reached the same way with a key.
"""

BACKEND_KINDS: frozenset[str] = frozenset(get_args(BackendKind))


class JobCounters(BaseModel):
    """What a backend has done since its worker started: counted by the worker, so any reader
    (``corral top``) derives rates from two heartbeats without watching job streams."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens_out: int = Field(default=0, ge=0)
    """Completion tokens streamed, running jobs' tokens so far included."""
    jobs_done: int = Field(default=0, ge=0)
    jobs_failed: int = Field(default=0, ge=0)
    """Jobs that ended with an error (a cancelled job is neither done nor failed)."""


class BackendInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    kind: str = Field(min_length=1, max_length=64)
    """A ``BackendKind``, read as plain text: a controller older than the worker (one that does
    not know a new kind) still reads the heartbeat and routes to the node, since routing needs
    the backend's name and models, never its transport."""
    url: str | None = None
    """Scheme, host and port only: never credentials or query strings."""
    healthy: bool
    error: str | None = None
    capacity: int = Field(ge=1)
    """How many requests the backend runs at once (OLLAMA_NUM_PARALLEL, llama.cpp slots)."""
    in_flight: int = Field(default=0, ge=0)
    latency_ms: float | None = None
    """Moving average of its time to first token on this node's recent jobs."""
    manages_models: bool = False
    """Whether pull / warm / unload / rm work on it (Ollama)."""
    models: tuple[ModelInfo, ...] = ()
    counters: JobCounters = JobCounters()

    @property
    def spare(self) -> int:
        return self.capacity - self.in_flight


class MemoryInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    total_bytes: int
    available_bytes: int


class GpuInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    total_bytes: int
    free_bytes: int


def free_memory_bytes(memory: MemoryInfo | None, gpus: tuple[GpuInfo, ...]) -> int | None:
    """What a new model could use: free VRAM plus available RAM (Ollama splits layers between
    them); None when neither is known."""
    if memory is None and not gpus:
        return None
    ram = memory.available_bytes if memory else 0
    return ram + sum(g.free_bytes for g in gpus)


class NodeInfo(Message):
    """One worker's heartbeat: who it is, what it can run, how busy it is."""

    name: Name
    version: str
    instance: str = ""
    """Random per worker process; the node's liveness key holds it too."""
    tags: frozenset[str] = frozenset()
    backends: tuple[BackendInfo, ...]
    memory: MemoryInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    cpu_load: float | None = None
    """1-minute load average divided by the number of cores (1.0 = every core busy)."""
    in_flight: int = Field(ge=0)
    capacity: int = Field(ge=1)
    heartbeat_interval_s: float = Field(gt=0)
    started_at: float
    sent_at: float

    def model_names(self) -> set[str]:
        return {m.name for b in self.backends for m in b.models}

    def free_memory_bytes(self) -> int | None:
        return free_memory_bytes(self.memory, self.gpus)


def describe_validation_error(exc: ValidationError) -> str:
    """Field paths and reasons only: pydantic's default text echoes the input, which may be a
    prompt or a URL with a key in it."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<message>'}: {err['msg']}"
        for err in exc.errors()
    )
