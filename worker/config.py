"""A node worker's own configuration: its name, tags and the backends it fronts.

Read from the ``worker:`` section of corral.yaml, then overridden by CLI flags. API keys are
written in the YAML as ``${VAR}`` and held as SecretStr from then on.
"""

from __future__ import annotations

import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from broker.errors import ConfigError
from broker.schemas import Name, describe_validation_error


class BackendSpec(BaseModel):
    """One local LLM server the node fronts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ollama", "openai", "simulated"]
    name: Name | None = None
    url: str | None = None
    api_key: SecretStr | None = None
    capacity: int = Field(default=1, ge=1, le=256)
    # Simulated backend only: its pace.
    first_token_s: float = Field(default=0.05, ge=0)
    token_s: float = Field(default=0.02, ge=0)
    crash_on: str | None = Field(default=None, min_length=1)
    """Chaos testing: the worker process dies on a prompt containing this text."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("backend URL must start with http:// or https://")
        return value.rstrip("/") if value else value


class WorkerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    tags: frozenset[str] = frozenset()
    backends: tuple[BackendSpec, ...] = Field(min_length=1)

    @field_validator("backends")
    @classmethod
    def _urls_for_http_kinds(cls, value: tuple[BackendSpec, ...]) -> tuple[BackendSpec, ...]:
        for spec in value:
            if spec.kind != "simulated" and not spec.url:
                raise ValueError(f"a {spec.kind} backend needs a url")
        names = backend_names(value)
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must differ: {names}")
        return value

    @property
    def capacity(self) -> int:
        return sum(spec.capacity for spec in self.backends)


def backend_names(specs: tuple[BackendSpec, ...]) -> list[str]:
    """Each backend's name: its own, else its kind, numbered from the second of a kind."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        count = seen[spec.kind]
        out.append(spec.name or (spec.kind if count == 1 else f"{spec.kind}{count}"))
    return out


def backend_spec(**fields: Any) -> BackendSpec:
    """A BackendSpec from CLI flags; a bad value is a ConfigError that names the flag's field."""
    try:
        return BackendSpec.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid {fields.get('kind', '')} backend: {describe_validation_error(exc)}"
        ) from None


def build_worker_config(yaml_section: dict[str, Any] | None, **flags: Any) -> WorkerConfig:
    """Merge corral.yaml's ``worker:`` section with CLI flags (flags win, ``None`` means unset)."""
    merged: dict[str, Any] = dict(yaml_section or {})
    merged.update({k: v for k, v in flags.items() if v not in (None, (), [])})
    if not merged.get("backends"):
        raise ConfigError(
            "no backend to front: give --ollama URL, --openai-compat URL or --simulate "
            "(or worker.backends in corral.yaml)"
        )
    try:
        return WorkerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid worker configuration: {describe_validation_error(exc)}"
        ) from None
