"""Settings shared by every corral process.

Sources, lowest precedence first: ``CORRAL_*`` environment variables, ``corral.yaml`` (path in
``CORRAL_CONFIG``, default ``./corral.yaml`` when present), then CLI flags passed as init
arguments. Values written as ``${VAR}`` in the YAML file are read from the environment, so
secrets stay out of the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from broker.errors import ConfigError
from broker.provider_models import check_provider_urls
from broker.ratelimits import ProviderLimits
from broker.schemas import BACKEND_KINDS

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env_references(value: Any) -> Any:
    """Replace ``${VAR}`` in every string of a parsed YAML document; a missing VAR is an error."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"corral.yaml refers to ${{{name}}}, which is not set")
            return os.environ[name]

        return _ENV_REFERENCE.sub(lookup, value)
    if isinstance(value, dict):
        return {k: expand_env_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env_references(v) for v in value]
    return value


def config_path() -> Path | None:
    explicit = os.environ.get("CORRAL_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"CORRAL_CONFIG points at {path}, which is not a file")
        return path
    default = Path("corral.yaml")
    return default if default.is_file() else None


def load_yaml_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    # Imported only when there is a file to read: a node started by flags alone never pays
    # for the YAML parser (see worker/__init__.py).
    import yaml  # noqa: PLC0415

    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    expanded: dict[str, Any] = expand_env_references(document)
    return expanded


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the top-level keys of corral.yaml that a settings class declares."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        document = load_yaml_config(config_path())
        self._values = {k: v for k, v in document.items() if k in settings_cls.model_fields}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class CorralSettings(BaseSettings):
    """What every corral process needs: where the broker is and the cluster's timing."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore", frozen=True)

    broker_url: SecretStr = SecretStr(DEFAULT_BROKER_URL)
    """Redis URL; a SecretStr because it may carry a password. ``rediss://`` is Redis over TLS;
    ``sentinel://h1:26379;sentinel://h2:26379`` asks those sentinels where the primary is."""
    broker_ca_file: str | None = None
    """PEM file of the CA that signed the broker's TLS certificate (``rediss://`` only)."""
    broker_master_name: str = Field(default="mymaster", min_length=1)
    """The primary's name the sentinels watch (``sentinel://`` broker URLs only)."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=60)
    job_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a job may run; also sizes Celery's visibility timeout."""
    replay_ttl_s: int = Field(default=3600, ge=10)
    """How long a finished job's events and result stay readable (``corral attach``)."""
    route_cache_s: float = Field(default=0.5, ge=0)
    """How long one client process reuses its view of the cluster when routing jobs (the
    jobs it sent meanwhile are counted in), and the gateway its table of named routes (a
    route edit reaches it within this time). 0 reads Redis before every job. Heartbeats come
    every ``heartbeat_interval_s`` anyway, so a short reuse loses little freshness."""
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    """A backend with no token after this long (loading the model included) has failed the
    attempt; the job moves to the next node."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """How many nodes a job may be tried on before it fails."""
    breaker_threshold: int = Field(default=3, ge=1)
    """Consecutive failures of a node or backend that open its circuit breaker."""
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    """How long an open breaker keeps traffic away before one probe job may try again."""
    session_ttl_s: int = Field(default=86400, ge=60)
    visibility_timeout_s: int | None = Field(default=None, ge=1)
    """How long Redis keeps a delivered, unacknowledged job before handing it out again (kombu's
    visibility timeout). Default: ``job_timeout_s`` + 60 s. A job that outlasts it is delivered
    a second time to its node's queue; the copy finds the job's lease taken and writes nothing."""
    max_prompt_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    """The largest prompt (all messages, UTF-8) a front door accepts. A job's message costs Redis
    about three times its size while queued (base64 body plus the unacked copy), so the limit
    keeps one oversized paste from filling the broker. 2 MiB is more than any local model's
    context window."""
    """How long a ``--session`` conversation is kept after its last turn."""
    aliases: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Model aliases: ``coder: [qwen2.5-coder:7b, deepseek-coder:6.7b]``, first choice first."""
    priority: tuple[str, ...] = ()
    """Models to walk, best first, for a job that names no model (or names ``auto``): each
    model's routes cheapest tier first (local, subscription, metered); the next model only
    when every route of this one is down, open-breakered or rate limited."""
    capabilities: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    """Rows that override or extend broker/data/capabilities.json, in its shape:
    ``{provider: {model glob: {context: 32768, vision: true}}}`` (broker.catalog)."""
    prices: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    """Rows looked at before broker/data/prices.json: ``{provider: {glob: {input, output}}}``
    in USD per million tokens."""
    gateway_fetch_image_urls: bool = False
    """Let the HTTP gateway fetch an image a request names by http(s) URL (public addresses
    only, checked after resolving, redirects too). Off: only ``data:`` URLs are taken."""
    provider_urls: dict[str, str] = Field(default_factory=dict)
    """Where a bare cloud model name (``claude-*``, ``gpt-*``, ...) that no node holds goes, per
    provider scheme: ``{anthropic: "anthropic://proxy.lan"}``; unset, the official endpoint."""
    limits: dict[str, ProviderLimits] = Field(default_factory=dict)
    """Requests (``rpm``) and tokens (``tpm``) a minute the whole cluster sends each provider
    kind, and optionally each model: ``anthropic: {rpm: 50, models: {claude-opus-4: {rpm: 5}}}``.
    Counted in Redis before every call (broker.ratelimits)."""
    quota_cooldown_s: float = Field(default=3600.0, gt=0)
    """How long a backend whose provider says its quota is spent gets no jobs, when the
    provider does not say when the quota resets."""
    otlp_endpoint: str | None = None
    """Send OpenTelemetry spans of each job to this OTLP/HTTP collector (a base URL such as
    ``http://127.0.0.1:4318``; ``/v1/traces`` is added). ``OTEL_EXPORTER_OTLP_ENDPOINT`` does
    the same. Needs the ``otel`` extra; unset, nothing of OpenTelemetry is loaded."""
    task_events: bool = False
    """Send Celery task events from the start. Off by default: they add about 2 ms to every
    job's first token, and Flower switches them on by itself while it runs (its
    ``--enable_events``, on by default)."""

    @field_validator("broker_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError(
                "broker URL must start with redis://, rediss://, unix:// or sentinel://"
            )
        if url.startswith("sentinel://") and not all(
            entry.strip().startswith("sentinel://") for entry in url.split(";")
        ):
            raise ValueError("every ;-separated entry of a Sentinel broker URL is sentinel://")
        return value

    @field_validator("limits")
    @classmethod
    def _known_limit_kinds(cls, value: dict[str, ProviderLimits]) -> dict[str, ProviderLimits]:
        unknown = sorted(set(value) - BACKEND_KINDS)
        if unknown:
            raise ValueError(
                f"limits name unknown backend kinds {', '.join(unknown)}"
                f" (known: {', '.join(sorted(BACKEND_KINDS))})"
            )
        return value

    @field_validator("provider_urls")
    @classmethod
    def _cloud_provider_urls(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            return check_provider_urls(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("broker_ca_file")
    @classmethod
    def _readable_ca_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"broker CA file {value} is not a file")
        return value

    @model_validator(mode="after")
    def _ca_file_needs_tls(self) -> CorralSettings:
        if self.broker_ca_file and not self.broker_url.get_secret_value().startswith("rediss://"):
            raise ValueError("broker_ca_file is set but the broker URL is not rediss:// (TLS)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags, then corral.yaml, then the environment.
        return (init_settings, _YamlSource(settings_cls), env_settings)


def build_settings(**cli_overrides: Any) -> CorralSettings:
    """Build settings once in ``main()``; ``None`` flags are left to the lower sources."""
    given = {k: v for k, v in cli_overrides.items() if v is not None}
    try:
        return CorralSettings(**given)
    except ConfigError:
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(_without_input_values(str(exc))) from None


def _without_input_values(message: str) -> str:
    """pydantic echoes the offending input; a broker URL may hold a password, so drop it."""
    return re.sub(r"input_value=.*?(?=, input_type|\])", "input_value=<hidden>", message)


def redacted_url(url: str) -> str:
    """A URL safe to print: the password (and user) replaced by ``***``, in every entry of a
    ``sentinel://a;sentinel://b`` list too. The user part ends at the last ``@`` before the
    path, so a password holding ``@`` is hidden whole."""
    return re.sub(r"//[^/;]*@", "//***@", url)


__all__ = [
    "DEFAULT_BROKER_URL",
    "CorralSettings",
    "build_settings",
    "load_yaml_config",
    "redacted_url",
]
