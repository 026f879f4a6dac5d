"""The typed, versioned messages that cross between controller and worker.

Every input (a job, a model operation, a stream event) is frozen with ``extra="forbid"``: a
message with an unknown field is rejected at the boundary instead of being half-understood.
Heartbeats (``NodeInfo`` and what it holds) ignore fields they do not know instead, so a
worker newer than its controller still shows up and serves what the controller understands.
Messages travel as ``model.model_dump(mode="json")`` (Celery task arguments) or
``model_dump_json()`` (Redis).
"""

from __future__ import annotations

import binascii
import json
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from broker.errors import ConfigError
from broker.route_url import parse_route_url

Role = Literal["system", "user", "assistant", "tool"]
Priority = Literal["interactive", "batch"]
Effort = Literal["minimal", "low", "medium", "high"]
"""How hard a reasoning model thinks: each adapter maps it onto its family's own control."""
EFFORTS: tuple[Effort, ...] = get_args(Effort)
JobKind = Literal["chat", "embed"]
"""``chat`` streams an answer to ``messages``; ``embed`` returns one vector per ``inputs`` text."""
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


SCHEMA_VERSION = 2
"""The wire schema every message carries as ``v`` (also written by the Lua scripts that build
events inside Redis)."""


class _OmitsUnusedAdditions(BaseModel):
    """Leaves fields added to the schema after it shipped out of the JSON while they hold
    their default: a plain chat's messages and tokens stay byte-for-byte what they were, which
    keeps each token's Redis write small and lets a reader that predates the fields (they
    forbid unknown ones) still read every message that does not use them."""

    _omit_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unused_additions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            fields = type(self).model_fields
            for name in self._omit_at_default:
                if getattr(self, name) == fields[name].default:
                    data.pop(name, None)
        return data


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[2] = 2
    """The schema version; a reader refuses a message of another.

    2: ``JobSpec.route`` (a pinned node) became ``JobSpec.node``, freeing "route" for named
    routes.
    """


MAX_TOOLS_BYTES = 256 * 1024
"""The most a request's tool definitions may take, as JSON: they travel in every task."""

ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class ToolCall(BaseModel):
    """A function call a model asked for. ``arguments`` is a JSON object here, whatever the
    wire (OpenAI sends a JSON string, Ollama an object): each adapter and API converts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    name: ToolName
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolFunction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ToolName
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] = Field(default_factory=dict)
    """A JSON Schema object describing the arguments."""
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """A tool a model may call, in OpenAI's shape (Ollama uses the same one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["function"] = "function"
    function: ToolFunction


def _is_base64(text: str) -> bool:
    try:
        binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return False
    return True


class ChatMessage(_OmitsUnusedAdditions):
    model_config = ConfigDict(frozen=True, extra="forbid")
    _omit_at_default = ("images", "tool_calls", "tool_call_id", "name")

    role: Role
    content: str
    images: tuple[str, ...] = ()
    """Base64-encoded image bytes, never a URL: a worker fetches nothing a request names."""
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant's calls, sent back in a conversation that carries their results."""
    tool_call_id: str | None = Field(default=None, max_length=128)
    """For role ``tool``: the call this message answers."""
    name: ToolName | None = None
    """For role ``tool``: the function that produced it."""

    @field_validator("images")
    @classmethod
    def _images_are_base64(cls, images: tuple[str, ...]) -> tuple[str, ...]:
        for index, image in enumerate(images):
            if not image or not _is_base64(image):
                raise ValueError(f"image {index} is not base64 data (URLs are not accepted here)")
        return images


class GenerationOptions(_OmitsUnusedAdditions):
    """The sampling options corral passes through to every backend kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _omit_at_default = ("think", "effort")

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    effort: Effort | None = None
    """Reasoning effort (``--effort``); a model without a reasoning control ignores it and the
    job's result says so in ``notes``."""
    think: bool | None = None
    """Ask a thinking model to think (Ollama's ``think``); None: the backend's default."""


class JobSpec(Message, _OmitsUnusedAdditions):
    """What a user asked for: the prompt and the hints the router uses."""

    _omit_at_default = ("tools", "route_url", "kind", "inputs")

    job_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")
    kind: JobKind = "chat"
    messages: tuple[ChatMessage, ...] = ()
    """A chat job's conversation: at least one message (an embed job has none)."""
    inputs: tuple[str, ...] = ()
    """An embed job's texts, one vector each, sent to the backend as one batch (a chat job
    has none)."""
    node: Name | None = None
    """Run on this node only (``@name`` when the name is a node; a route pins none)."""
    route: Name | None = None
    """The named route ``@name`` resolved to, for the record (Flower, logs)."""
    route_url: str | None = Field(default=None, min_length=1, max_length=512)
    """The route's endpoint (``anthropic://``, ``ollama://pi2``): the router sends the job only
    to a node fronting it or, for a cloud route, to a ``--cloud`` worker holding the
    provider's key, which builds the adapter for it. Never holds credentials (a route URL
    cannot)."""
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
    tools: tuple[ToolDefinition, ...] = Field(default=(), max_length=128)
    """Functions the model may call; routed only to models with the ``tools`` capability."""

    @field_validator("tools")
    @classmethod
    def _tools_fit(cls, tools: tuple[ToolDefinition, ...]) -> tuple[ToolDefinition, ...]:
        size = len(json.dumps([t.model_dump(mode="json") for t in tools]))
        if size > MAX_TOOLS_BYTES:
            raise ValueError(f"the tool definitions take {size} bytes, over {MAX_TOOLS_BYTES}")
        return tools

    def needs(self) -> frozenset[Capability]:
        """The model capabilities this job cannot run without: tools, images."""
        needed: set[Capability] = set()
        if self.tools:
            needed.add("tools")
        if any(m.images for m in self.messages):
            needed.add("vision")
        return frozenset(needed)

    @field_validator("route_url")
    @classmethod
    def _readable_route_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_route_url(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _payload_fits_kind(self) -> JobSpec:
        if self.kind == "chat":
            if not self.messages:
                raise ValueError("a chat job needs at least one message")
            if self.inputs:
                raise ValueError("a chat job takes messages, not inputs")
        else:
            if not self.inputs:
                raise ValueError("an embed job needs at least one input")
            if self.messages:
                raise ValueError("an embed job takes inputs, not messages")
            if self.session is not None:
                raise ValueError("an embed job has no conversation to keep (no session)")
        return self


class JobAssignment(Message, _OmitsUnusedAdditions):
    """The Celery task argument: a job plus the router's choice of backend and model on the node."""

    _omit_at_default = ("tier", "reason")

    spec: JobSpec
    node: Name
    backend: Name
    model: str = Field(min_length=1)
    attempt: int = Field(default=1, ge=1)
    """Which try this is; only the attempt the job's lease authorises may stream."""
    tier: str | None = None
    """The cost tier of the chosen backend (``local``, ``subscription``, ``metered``)."""
    reason: str | None = Field(default=None, max_length=1000)
    """Why the router chose this route (what cheaper routes it skipped): echoed in the
    started event and the result."""

    def argsrepr(self) -> str:
        """What Flower and the worker log show instead of the prompt."""
        route = f" route={self.spec.route}" if self.spec.route else ""
        kind = " kind=embed" if self.spec.kind == "embed" else ""
        return (
            f"job={self.spec.job_id}{kind}{route} node={self.node} model={self.model} "
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


class StartedEvent(_Event, _OmitsUnusedAdditions):
    _omit_at_default = ("tier", "reason")

    type: Literal["started"] = "started"
    node: str
    backend: str
    model: str
    attempt: int = 1
    instance: str | None = None
    """The worker process serving it: a restarted worker has a new one."""
    tier: str | None = None
    """The cost tier serving it (``local``, ``subscription``, ``metered``)."""
    reason: str | None = None
    """Why this route: the cheaper routes skipped and what was wrong with them."""


class DeltaEvent(_Event, _OmitsUnusedAdditions):
    _omit_at_default = ("reasoning", "tool_calls")

    type: Literal["delta"] = "delta"
    text: str
    reasoning: str = ""
    """A thinking model's reasoning, kept apart from the answer's ``text``."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Complete calls (their arguments whole), in the order the model made them."""

    def has_output(self) -> bool:
        """Whether the model produced anything here (text, reasoning or a call)."""
        return bool(self.text or self.reasoning or self.tool_calls)


class Usage(_OmitsUnusedAdditions):
    model_config = ConfigDict(frozen=True, extra="forbid")
    _omit_at_default = ("cost_usd",)

    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cost_usd: float | None = None
    """Estimated from the price table (broker/data/prices.json); None for a local or unpriced
    model."""


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    queued_ms: float
    """From the controller creating the job to the worker starting it."""
    first_token_ms: float | None
    """From the worker starting the job to the first token."""
    total_ms: float
    """From the controller creating the job to the last token."""


class JobResult(Message, _OmitsUnusedAdditions):
    """The final outcome, kept after the stream ends."""

    _omit_at_default = ("tool_calls", "reasoning", "tier", "reason", "notes", "embeddings")

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
    tier: str | None = None
    """The cost tier that served it (``local``, ``subscription``, ``metered``)."""
    reason: str | None = None
    """Why that route (see ``StartedEvent.reason``)."""
    notes: tuple[str, ...] = ()
    """What the user should know about how the job ran ("effort ignored: ...")."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the model made; ``finish_reason`` is then ``tool_calls``."""
    reasoning: str = ""
    embeddings: tuple[tuple[float, ...], ...] = ()
    """An embed job's vectors, one per input in the order sent (``usage.prompt_tokens`` counts
    the inputs' tokens). They travel whole in the done event and the result key."""


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


HEARTBEAT_CONFIG = ConfigDict(frozen=True, extra="ignore")
"""Heartbeat parts ignore unknown fields: a newer worker's heartbeat is still read."""


class ModelInfo(BaseModel):
    model_config = HEARTBEAT_CONFIG

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

    def serves_embed(self) -> bool:
        """Only a model that says so: a backend that does not say is assumed to chat."""
        return "embed" in self.capabilities


BackendKind = Literal[
    "ollama",
    "openai",
    "simulated",
    "anthropic",
    "google",
    "openai-cloud",
    "mistral",
    "deepseek",
    "cli",
]
"""Every kind of backend a worker can front: its transport and, for a cloud, the provider.

``openai`` is any OpenAI-compatible server on the network (llama.cpp, vLLM, LM Studio);
``openai-cloud``, ``mistral`` and ``deepseek`` are the providers reached the same way with a key;
``cli`` is an installed agent CLI (``claude -p``, ``codex exec``) on the node's subscription.
"""

BACKEND_KINDS: frozenset[str] = frozenset(get_args(BackendKind))


class JobCounters(BaseModel):
    """What a backend has done since its worker started: counted by the worker, so any reader
    (``corral top``) derives rates from two heartbeats without watching job streams."""

    model_config = HEARTBEAT_CONFIG

    tokens_out: int = Field(default=0, ge=0)
    """Completion tokens streamed, running jobs' tokens so far included."""
    jobs_done: int = Field(default=0, ge=0)
    jobs_failed: int = Field(default=0, ge=0)
    """Jobs that ended with an error (a cancelled job is neither done nor failed)."""


class BackendInfo(_OmitsUnusedAdditions):
    model_config = HEARTBEAT_CONFIG
    _omit_at_default = ("quota_left",)

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
    quota_left: float | None = Field(default=None, ge=0, le=1)
    """A cloud backend's smallest share left of its provider's rate limits, from the headers
    of its last answers (``broker.quota``); None: unknown, or no such limits."""

    @property
    def spare(self) -> int:
        return self.capacity - self.in_flight


class MemoryInfo(BaseModel):
    model_config = HEARTBEAT_CONFIG

    total_bytes: int
    available_bytes: int


class GpuInfo(BaseModel):
    model_config = HEARTBEAT_CONFIG

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

    model_config = HEARTBEAT_CONFIG

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
    cloud_providers: frozenset[str] = frozenset()
    """Backend kinds (``anthropic``, ``google``...) this ``--cloud`` worker holds a key for and
    builds an adapter for on demand, for any route of that provider. Never the key."""

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
