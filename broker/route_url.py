"""Reading a route's URL (``ollama://pi2:11434``, ``anthropic://``) into what serves it.

Pure: no I/O. Both sides read route URLs (the controller to check and resolve them, a worker
to build an adapter for one), so the parser lives in the broker.

Scheme              backend kind    base URL
``ollama://H[:P]``  ollama          ``http://H:P`` (port 11434)
``http(s)://H[:P]`` ollama          as written (port 11434)
``llamafile://``,   openai          ``http://H:P`` (port 8080), OpenAI-compatible
``llamacpp://``
``openai://``       openai-cloud    alone: the provider's endpoint; with a host: ``https://H...``
``anthropic://``    anthropic       ``SCHEME+http://H:P`` is the same over plain HTTP (local
``gemini://``       google          proxies and tests)
``mistral://``      mistral
``deepseek://``     deepseek
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from broker.errors import ConfigError

if TYPE_CHECKING:  # schemas imports this module for JobSpec's check of route_url
    from broker.schemas import BackendInfo, NodeInfo

OLLAMA_PORT = 11434
OPENAI_COMPAT_PORT = 8080

CLOUD_SCHEMES: dict[str, str] = {
    "openai": "openai-cloud",
    "anthropic": "anthropic",
    "gemini": "google",
    "mistral": "mistral",
    "deepseek": "deepseek",
}
"""URL scheme -> backend kind of each cloud provider."""

OFFICIAL_ENDPOINTS: dict[str, str] = {
    "openai-cloud": "https://api.openai.com/v1",
    "mistral": "https://api.mistral.ai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
}
"""Where a cloud scheme alone (``anthropic://``) goes (the same as worker.config's defaults)."""

KEY_VARIABLES: dict[str, tuple[str, ...]] = {
    "openai-cloud": ("OPENAI_API_KEY",),
    "mistral": ("MISTRAL_API_KEY",),
    "deepseek": ("DEEPSEEK_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "google": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}
"""The environment variables a worker reads a provider's key from, in order."""

LOCAL_SCHEMES: dict[str, tuple[str, int]] = {
    "ollama": ("ollama", OLLAMA_PORT),
    "http": ("ollama", OLLAMA_PORT),
    "https": ("ollama", OLLAMA_PORT),
    "llamafile": ("openai", OPENAI_COMPAT_PORT),
    "llamacpp": ("openai", OPENAI_COMPAT_PORT),
}


@dataclass(frozen=True)
class RouteTarget:
    """What a route URL points at: a backend kind and the base URL an adapter would call."""

    kind: str
    base_url: str
    cloud: bool

    @property
    def key_variables(self) -> tuple[str, ...]:
        """The variables a worker needs one of to serve this route (none for a local one)."""
        return KEY_VARIABLES.get(self.kind, ())

    def missing_worker_reason(self) -> str:
        """Why no worker serves this target, and what to start so one does."""
        if self.cloud:
            keys = " or ".join(self.key_variables)
            return (
                f"no worker holds {keys} for it: start `corral worker --cloud` (or `cloud: true`"
                f" in corral.yaml) with {keys} in its environment, or give a worker a "
                f"{self.kind} backend at {self.base_url}"
            )
        return f"no worker fronts {self.base_url}: start one with that backend on the node"

    @property
    def origin(self) -> str:
        """Scheme, host and port: what a worker's heartbeat shows of a backend's URL."""
        return origin_of(self.base_url) or self.base_url


def parse_route_url(url: str) -> RouteTarget:
    """``ollama://pi2`` -> ``RouteTarget("ollama", "http://pi2:11434", cloud=False)``.

    Raises ConfigError for an unknown scheme, a missing host, or credentials or a query in
    the URL (keys never live in a route: a worker reads its own from its environment).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"route URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if parts.username or parts.password or "@" in parts.netloc:
        raise ConfigError("a route URL holds no credentials: workers read keys from their env")
    if parts.query or parts.fragment:
        raise ConfigError("a route URL takes no query string or fragment")
    base_scheme, plus, transport = scheme.partition("+")
    if base_scheme in CLOUD_SCHEMES:
        if plus and transport != "http":
            raise ConfigError(
                f"{scheme}:// is not a route scheme: did you mean {base_scheme}+http://?"
            )
        return _cloud(CLOUD_SCHEMES[base_scheme], parts, port, "http" if plus else "https")
    if scheme in LOCAL_SCHEMES:
        kind, default_port = LOCAL_SCHEMES[scheme]
        if not parts.hostname:
            raise ConfigError(f"{url!r} names no host (e.g. {scheme}://127.0.0.1:{default_port})")
        http = "https" if scheme == "https" else "http"
        path = parts.path.rstrip("/")
        return RouteTarget(kind, f"{http}://{_host(parts)}:{port or default_port}{path}", False)
    known = ", ".join(f"{s}://" for s in [*LOCAL_SCHEMES, *CLOUD_SCHEMES])
    raise ConfigError(f"{url!r}: unknown route scheme {scheme or '(none)'!r}; one of {known}")


def _cloud(kind: str, parts: SplitResult, port: int | None, http: str) -> RouteTarget:
    if not parts.hostname:
        if http == "http":
            raise ConfigError(f"{parts.scheme}:// needs HOST:PORT (a local proxy)")
        return RouteTarget(kind, OFFICIAL_ENDPOINTS[kind], True)
    where = _host(parts) + (f":{port}" if port else "")
    return RouteTarget(kind, f"{http}://{where}{parts.path.rstrip('/')}", True)


def _host(parts: SplitResult) -> str:
    host = parts.hostname or ""
    return f"[{host}]" if ":" in host else host


def origin_of(url: str) -> str | None:
    """A heartbeat's backend URL as ``scheme://host:port``, default ports filled in."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return f"{parts.scheme}://{parts.hostname}:{port}"


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Names of this machine: a route written with one reaches a backend a worker lists with another."""


def same_endpoint(a: str, b: str) -> bool:
    """Whether two URLs reach one server: same scheme and port, and the same host, where
    ``localhost``, ``127.0.0.1`` and ``::1`` are one host."""
    left, right = _endpoint_key(a), _endpoint_key(b)
    return left is not None and left == right


def _endpoint_key(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host or port is None:
        return None
    return parts.scheme, "loopback" if host in LOOPBACK_HOSTS else host, port


def on_demand_backend(kind: str) -> str:
    """The backend name a ``--cloud`` worker gives the adapter it builds for a route of
    ``kind`` (one per provider, so its jobs share one set of slots and one breaker)."""
    return f"cloud-{kind}"


def fronting_backends(target: RouteTarget, backends: Iterable[BackendInfo]) -> list[BackendInfo]:
    """The node's own backends at the route's endpoint (same kind, scheme, host and port)."""
    return [
        b
        for b in backends
        if b.url is not None and b.kind == target.kind and same_endpoint(b.url, target.base_url)
    ]


def serves_on_demand(target: RouteTarget, info: NodeInfo) -> bool:
    """Whether the node would build an adapter for the route itself: a cloud route, and a
    worker started with ``--cloud`` that holds that provider's key."""
    return target.cloud and target.kind in info.cloud_providers
