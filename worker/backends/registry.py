"""Building backend adapters from configuration: one factory per kind, one shared HTTP client.

Each factory imports its adapter when called: a node loads only the adapters it runs (the
cloud ones cost a Pi fronting one Ollama about 1 MB of memory and 30 ms of start-up).
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from broker.errors import ConfigError
from broker.route_url import RouteTarget, on_demand_backend
from broker.schemas import BackendKind
from worker.backends.base import Backend
from worker.config import (
    AnthropicSpec,
    AnySpec,
    CliSpec,
    CloudSpec,
    GoogleSpec,
    OllamaSpec,
    OpenAICloudSpec,
    OpenAICompatSpec,
    SimulatedSpec,
    WorkerConfig,
    api_key_for,
    backend_names,
    backend_spec,
    base_url_of,
)

__all__ = [
    "FACTORIES",
    "build_backend",
    "build_backends",
    "build_route_backend",
    "import_adapters",
    "make_http_client",
    "needs_tls",
]

CONNECT_TIMEOUT_S = 5.0

Factory = Callable[[str, Any, httpx.AsyncClient], Backend]


def make_http_client(read_timeout_s: float, *, tls: bool = True) -> httpx.AsyncClient:
    """One pooled client for every adapter of the node.

    Reads may wait long (a Pi loading a model before its first token), connects may not.
    ``tls=False`` is for a node whose backends are all plain HTTP (an Ollama on the same
    machine): httpx's default context loads the whole CA bundle, about 3 MB of a Pi's memory
    resident for nothing. Its stand-in still verifies, and trusts no one, so an HTTPS request
    made by mistake fails with a certificate error instead of going unverified.
    """
    verify: ssl.SSLContext | bool = True if tls else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        verify=verify,
    )


def needs_tls(config: WorkerConfig) -> bool:
    """Whether any configured backend is reached over HTTPS (every cloud provider is)."""
    if config.cloud:
        return True
    for spec in config.backends:
        if isinstance(spec, SimulatedSpec | CliSpec):
            continue
        url = base_url_of(spec, spec.kind) if isinstance(spec, CloudSpec) else spec.url
        if not url.lower().startswith("http://"):
            return True
    return False


def _simulated(name: str, spec: SimulatedSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.simulated import DEFAULT_MODELS, SimulatedBackend  # noqa: PLC0415

    return SimulatedBackend(
        name,
        first_token_s=spec.first_token_s,
        token_s=spec.token_s,
        capacity=spec.capacity,
        crash_on=spec.crash_on,
        models=spec.models if spec.models is not None else DEFAULT_MODELS,
    )


def _ollama(name: str, spec: OllamaSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.ollama import OllamaBackend  # noqa: PLC0415

    return OllamaBackend(name, spec.url, client, capacity=spec.capacity)


def _openai(name: str, spec: OpenAICompatSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.openai_compat import OpenAICompatBackend  # noqa: PLC0415

    # Not configured: the server may say (llama.cpp's slots). The node's own capacity,
    # which sizes Celery's pool, still follows the configuration.
    configured = spec.capacity if "capacity" in spec.model_fields_set else None
    return OpenAICompatBackend(
        name,
        spec.url,
        client,
        capacity=configured,
        api_key=spec.api_key,
        embed_models=spec.embed_models,
    )


def _openai_cloud(name: str, spec: OpenAICloudSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.cloud import ModelCache  # noqa: PLC0415
    from worker.backends.openai_compat import OpenAICompatBackend  # noqa: PLC0415

    key, source = api_key_for(spec, spec.kind, name)
    return OpenAICompatBackend(
        name,
        base_url_of(spec, spec.kind),
        client,
        capacity=spec.capacity,
        api_key=key,
        kind=spec.kind,
        key_source=source,
        models=ModelCache(spec.models_ttl_s, spec.models),
    )


def _anthropic(name: str, spec: AnthropicSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.anthropic import AnthropicBackend  # noqa: PLC0415
    from worker.backends.cloud import ModelCache  # noqa: PLC0415

    key, source = api_key_for(spec, "anthropic", name)
    return AnthropicBackend(
        name,
        base_url_of(spec, "anthropic"),
        client,
        key,
        key_source=source,
        capacity=spec.capacity,
        max_tokens=spec.max_tokens,
        version=spec.anthropic_version,
        models=ModelCache(spec.models_ttl_s, spec.models),
    )


def _google(name: str, spec: GoogleSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.cloud import ModelCache  # noqa: PLC0415
    from worker.backends.google import GoogleBackend  # noqa: PLC0415

    key, source = api_key_for(spec, "google", name)
    return GoogleBackend(
        name,
        base_url_of(spec, "google"),
        client,
        key,
        key_source=source,
        capacity=spec.capacity,
        models=ModelCache(spec.models_ttl_s, spec.models),
    )


def _agent_cli(name: str, spec: CliSpec, client: httpx.AsyncClient) -> Backend:
    from worker.backends.agent_cli import AgentCliBackend, check_no_secrets  # noqa: PLC0415
    from worker.backends.cli_output import invocation_for  # noqa: PLC0415

    invocation = invocation_for(spec)
    check_no_secrets(invocation.command, name)
    return AgentCliBackend(
        name, invocation, spec.models, capacity=spec.capacity, workdir=spec.workdir
    )


FACTORIES: Mapping[BackendKind, Factory] = {
    "simulated": _simulated,
    "ollama": _ollama,
    "openai": _openai,
    "openai-cloud": _openai_cloud,
    "mistral": _openai_cloud,
    "deepseek": _openai_cloud,
    "anthropic": _anthropic,
    "google": _google,
    "cli": _agent_cli,
}
"""Every ``BackendKind`` and the adapter that serves it (tests check none is missing)."""


ADAPTER_MODULES: Mapping[str, tuple[str, ...]] = {
    "simulated": ("worker.backends.simulated",),
    "ollama": ("worker.backends.ollama",),
    "openai": ("worker.backends.openai_compat",),
    "openai-cloud": ("worker.backends.cloud", "worker.backends.openai_compat"),
    "mistral": ("worker.backends.cloud", "worker.backends.openai_compat"),
    "deepseek": ("worker.backends.cloud", "worker.backends.openai_compat"),
    "anthropic": ("worker.backends.cloud", "worker.backends.anthropic"),
    "google": ("worker.backends.cloud", "worker.backends.google"),
    "cli": ("worker.backends.agent_cli", "worker.backends.cli_output"),
}
"""The modules each kind's factory imports when called."""

# What the node's httpx client imports when it is made (its connection pool, which brings
# HTTP/1.1), and on its first request (anyio's asyncio backend): each node makes the client,
# only one with an HTTP backend sends requests.
_HTTP_CLIENT = ("httpcore",)
_HTTP_REQUESTS = ("anyio._backends._asyncio",)


def import_adapters(config: WorkerConfig) -> None:
    """Import the configured backends' adapters, and what their HTTP client uses, now.

    Called on the main thread before the node's event loop starts: every import after that
    would run on the loop's thread, and glibc gives a second thread its own malloc arena,
    which keeps the high-water mark of what the thread allocated. On the main thread the
    same imports share the heap that start-up already grew (about 0.1 MB less resident).
    Nothing is imported that the node would not import by its first heartbeat.
    """
    kinds = {spec.kind for spec in config.backends}
    modules = [module for kind in sorted(kinds) for module in ADAPTER_MODULES[kind]]
    modules += _HTTP_CLIENT
    if kinds - {"simulated", "cli"}:
        modules += _HTTP_REQUESTS
    for module in modules:
        importlib.import_module(module)


def build_backend(name: str, spec: AnySpec, client: httpx.AsyncClient) -> Backend:
    factory = FACTORIES.get(spec.kind)
    if factory is None:  # only if a kind is added to the config without an adapter
        raise ConfigError(f"no adapter for backend kind {spec.kind!r}")
    return factory(name, spec, client)


def build_route_backend(
    target: RouteTarget, client: httpx.AsyncClient, *, capacity: int
) -> Backend:
    """The adapter a ``--cloud`` worker builds for a cloud route's endpoint, with the key in
    its own environment (ConfigError naming the variables if it has none)."""
    if not target.cloud:
        raise ConfigError(f"{target.base_url} is not a cloud endpoint: --cloud serves only those")
    spec = backend_spec(kind=target.kind, url=target.base_url, capacity=capacity)
    return build_backend(on_demand_backend(target.kind), spec, client)


def build_backends(config: WorkerConfig, client: httpx.AsyncClient) -> dict[str, Backend]:
    """Every configured backend; a cloud backend without its key is a ConfigError."""
    return {
        name: build_backend(name, spec, client)
        for name, spec in zip(backend_names(config.backends), config.backends, strict=True)
    }
