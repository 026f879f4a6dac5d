"""Building backend adapters from configuration, with one shared HTTP client."""

from __future__ import annotations

import httpx

from worker.backends.base import Backend
from worker.backends.ollama import OllamaBackend
from worker.backends.openai_compat import OpenAICompatBackend
from worker.backends.simulated import SimulatedBackend
from worker.config import WorkerConfig, backend_names

CONNECT_TIMEOUT_S = 5.0


def make_http_client(read_timeout_s: float) -> httpx.AsyncClient:
    """One pooled client for every adapter of the node.

    Reads may wait long (a Pi loading a model before its first token), connects may not.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )


def build_backends(config: WorkerConfig, client: httpx.AsyncClient) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, spec in zip(backend_names(config.backends), config.backends, strict=True):
        backend: Backend
        if spec.kind == "simulated":
            backend = SimulatedBackend(
                name,
                first_token_s=spec.first_token_s,
                token_s=spec.token_s,
                capacity=spec.capacity,
                crash_on=spec.crash_on,
            )
        elif spec.kind == "ollama":
            assert spec.url is not None  # checked by WorkerConfig
            backend = OllamaBackend(name, spec.url, client, capacity=spec.capacity)
        else:
            assert spec.url is not None
            # Not configured: the server may say (llama.cpp's slots). The node's own capacity,
            # which sizes Celery's pool, still follows the configuration.
            configured = spec.capacity if "capacity" in spec.model_fields_set else None
            backend = OpenAICompatBackend(
                name, spec.url, client, capacity=configured, api_key=spec.api_key
            )
        backends[name] = backend
    return backends
