"""A node worker's own configuration: its name, tags and the backends it fronts.

Read from the ``worker:`` section of corral.yaml, then overridden by CLI flags. Each backend is
one entry of a union discriminated by ``kind``, so one kind's settings (a simulated backend's
pace, a provider's key variable) do not sit on all. API keys are written in the YAML as
``${VAR}`` (or left to the provider's usual variable, ``ANTHROPIC_API_KEY`` and the like) and
held as SecretStr from then on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.errors import ConfigError
from broker.route_url import KEY_VARIABLES, OFFICIAL_ENDPOINTS
from broker.schemas import BackendKind, Name, describe_validation_error

__all__ = [
    "AnthropicSpec",
    "BackendSpec",
    "CliSpec",
    "CloudSpec",
    "GoogleSpec",
    "OllamaSpec",
    "OpenAICloudSpec",
    "OpenAICompatSpec",
    "SimulatedSpec",
    "WorkerConfig",
    "api_key_for",
    "backend_names",
    "backend_spec",
    "build_worker_config",
    "providers_with_keys",
    "require_keys",
]


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("backend URL must start with http:// or https://")
    return value.rstrip("/") if value else value


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name | None = None
    capacity: int = Field(default=1, ge=1, le=256)


class OllamaSpec(_Spec):
    """An Ollama server."""

    kind: Literal["ollama"]
    url: str

    _check_url = field_validator("url")(_http_url)


class OpenAICompatSpec(_Spec):
    """An OpenAI-compatible server on the network (llama.cpp, llamafile, vLLM, LM Studio)."""

    kind: Literal["openai"]
    url: str
    api_key: SecretStr | None = None
    embed_models: tuple[str, ...] = ()
    """Models the server serves embeddings with and only embeddings (llama.cpp started with
    ``--embedding``): its /v1/models does not say, so embed jobs go only to those listed."""

    _check_url = field_validator("url")(_http_url)


class SimulatedSpec(_Spec):
    """corral's built-in simulated backend, with its pace."""

    kind: Literal["simulated"]
    first_token_s: float = Field(default=0.05, ge=0)
    token_s: float = Field(default=0.02, ge=0)
    crash_on: str | None = Field(default=None, min_length=1)
    """Chaos testing: the worker process dies on a prompt containing this text."""
    models: tuple[str, ...] | None = Field(default=None, min_length=1)
    """The models it starts with (None: sim-small and sim-large); ``sim-embed`` embeds."""


class CloudSpec(_Spec):
    """What every cloud provider's backend has: where, which key, which models."""

    url: str | None = None
    """The API's base URL; None: the provider's own (tests point it at a fake)."""
    api_key: SecretStr | None = None
    """The key itself, written ``${VAR}`` in corral.yaml; None: read ``api_key_env``."""
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the key; None: the provider's usual one."""
    capacity: int = Field(default=4, ge=1, le=256)
    models: tuple[str, ...] = ()
    """Serve these models only, without asking the provider for its list."""
    models_ttl_s: float = Field(default=3600.0, gt=0)
    """How long the provider's model list is kept before it is asked again."""

    _check_url = field_validator("url")(_http_url)


class OpenAICloudSpec(CloudSpec):
    """A provider with OpenAI's chat completions API: OpenAI, Mistral, DeepSeek."""

    kind: Literal["openai-cloud", "mistral", "deepseek"]


class AnthropicSpec(CloudSpec):
    """Anthropic's Messages API."""

    kind: Literal["anthropic"]
    anthropic_version: str = "2023-06-01"
    max_tokens: int = Field(default=4096, ge=1)
    """Anthropic requires a limit on every request: this one when the job sets none."""


class GoogleSpec(CloudSpec):
    """Google's Gemini API (generativelanguage.googleapis.com)."""

    kind: Literal["google"]


CliPresetName = Literal["claude", "codex", "gemini", "opencode"]
CliOutput = Literal["text", "jsonl"]


class CliSpec(_Spec):
    """An installed agent CLI run once per job on the node's subscription (``claude -p``).

    ``preset`` gives the command, model flag and output format of a known CLI; ``command``,
    ``model_flag``, ``output`` and ``text_path`` describe another one, or override the
    preset's. The prompt always goes on stdin, never on the command line.
    """

    kind: Literal["cli"]
    preset: CliPresetName | None = None
    command: tuple[str, ...] = ()
    """The program and its fixed arguments; empty: the preset's."""
    model_flag: str | None = None
    """The flag that names the model (``--model``); None: the preset's; "" for none."""
    output: CliOutput | None = None
    """``text``: each stdout line is answer text; ``jsonl``: each line is a JSON object whose
    ``text_path`` holds the text. None: the preset's (text without a preset)."""
    text_path: str | None = Field(default=None, min_length=1)
    """Dotted path to the text in a JSON line (``event.delta.text``)."""
    match: dict[str, str] = Field(default_factory=dict)
    """JSON lines are text only where these dotted paths have these values."""
    models: tuple[str, ...] = Field(min_length=1)
    """The models this CLI serves, as the router sees them (passed with ``model_flag``)."""
    rate_limit_patterns: tuple[str, ...] = ()
    """Extra regular expressions (case-insensitive) that mark the CLI's output a rate limit."""
    workdir: str | None = None
    """Where the CLI runs; None: a fresh empty directory per job (an agent may write files)."""


AnySpec = (
    OllamaSpec
    | OpenAICompatSpec
    | SimulatedSpec
    | OpenAICloudSpec
    | AnthropicSpec
    | GoogleSpec
    | CliSpec
)
BackendSpec = Annotated[AnySpec, Field(discriminator="kind")]
_SPEC: TypeAdapter[AnySpec] = TypeAdapter(BackendSpec)

DEFAULT_BASE_URLS: Mapping[str, str] = OFFICIAL_ENDPOINTS
"""Each provider's own endpoint (the one a route's bare ``anthropic://`` means too)."""
# KEY_VARIABLES (from broker.route_url): where each provider's key is looked for, in order,
# when the configuration names none; the controller names them in its messages.


def base_url_of(spec: CloudSpec, kind: BackendKind) -> str:
    return spec.url or DEFAULT_BASE_URLS[kind]


def api_key_for(
    spec: CloudSpec, kind: BackendKind, name: str, environ: Mapping[str, str] | None = None
) -> tuple[SecretStr, str]:
    """The backend's key and where it came from (a variable's name, for messages).

    A key written in corral.yaml wins; then ``api_key_env``; then the provider's usual
    variables. None set is a ConfigError naming the variables, so the worker stops at start-up
    instead of failing every job with a 401.
    """
    env = os.environ if environ is None else environ
    if spec.api_key is not None and spec.api_key.get_secret_value():
        return spec.api_key, f"the api_key of backend {name!r} in corral.yaml"
    variables = (spec.api_key_env,) if spec.api_key_env else KEY_VARIABLES[kind]
    for variable in variables:
        value = env.get(variable, "")
        if value:
            return SecretStr(value), variable
    raise ConfigError(
        f"{kind} backend {name!r} needs an API key: set {' or '.join(variables)} "
        "(or api_key: ${VAR} in corral.yaml)"
    )


def providers_with_keys(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The cloud backend kinds whose key is in the environment: what a ``--cloud`` worker
    advertises (the kinds, never the keys)."""
    env = os.environ if environ is None else environ
    return frozenset(
        kind for kind, variables in KEY_VARIABLES.items() if any(env.get(v) for v in variables)
    )


CLOUD_CAPACITY = 4
"""Parallel requests a ``--cloud`` worker sends to each provider it serves routes of."""


def require_keys(config: WorkerConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError now if a cloud backend has no key, or ``cloud`` is on and no
    provider's key is set (before the worker connects)."""
    if config.cloud and not providers_with_keys(environ):
        variables = ", ".join(v for vs in KEY_VARIABLES.values() for v in vs)
        raise ConfigError(
            f"--cloud serves cloud routes with the worker's own keys: set one of {variables}"
        )
    for name, spec in zip(backend_names(config.backends), config.backends, strict=True):
        if isinstance(spec, CloudSpec):
            api_key_for(spec, spec.kind, name, environ)


class WorkerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    tags: frozenset[str] = frozenset()
    backends: tuple[BackendSpec, ...] = ()
    cloud: bool = False
    """Serve any cloud route whose provider's key is in the environment (``--cloud``): the
    adapter for a route is built when its first job comes, with this worker's key."""

    @model_validator(mode="after")
    def _something_to_serve(self) -> WorkerConfig:
        if not self.backends and not self.cloud:
            raise ValueError(_NOTHING_TO_SERVE)
        return self

    @field_validator("backends")
    @classmethod
    def _distinct_names(cls, value: tuple[AnySpec, ...]) -> tuple[AnySpec, ...]:
        names = backend_names(value)
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must differ: {names}")
        return value

    @property
    def capacity(self) -> int:
        return sum(spec.capacity for spec in self.backends) + self.cloud_capacity

    @property
    def cloud_capacity(self) -> int:
        """Job slots kept for cloud routes' jobs (``--cloud``)."""
        return CLOUD_CAPACITY if self.cloud else 0


_NOTHING_TO_SERVE = (
    "no backend to front: give --ollama URL, --openai-compat URL, --simulate, a provider "
    "(--anthropic, --google, --openai-cloud, --mistral, --deepseek) or --cloud, or "
    "worker.backends in corral.yaml"
)


def backend_names(specs: tuple[AnySpec, ...]) -> list[str]:
    """Each backend's name: its own, else its kind, numbered from the second of a kind."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        count = seen[spec.kind]
        out.append(spec.name or (spec.kind if count == 1 else f"{spec.kind}{count}"))
    return out


def backend_spec(**fields: Any) -> AnySpec:
    """A backend's spec from CLI flags; a bad value is a ConfigError that names the field."""
    try:
        return _SPEC.validate_python(fields)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid {fields.get('kind', '')} backend: {describe_validation_error(exc)}"
        ) from None


def build_worker_config(yaml_section: dict[str, Any] | None, **flags: Any) -> WorkerConfig:
    """Merge corral.yaml's ``worker:`` section with CLI flags (flags win, ``None`` means unset)."""
    merged: dict[str, Any] = dict(yaml_section or {})
    merged.update({k: v for k, v in flags.items() if v not in (None, (), [])})
    if not merged.get("backends") and not merged.get("cloud"):
        raise ConfigError(_NOTHING_TO_SERVE)
    try:
        return WorkerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid worker configuration: {describe_validation_error(exc)}"
        ) from None
