"""The one place corral makes Redis clients: plain, TLS (``rediss://``) or through Sentinel.

Every process reads and writes its own keys (leases, streams, heartbeats) beside Celery's
queues, so these clients must follow the broker wherever it goes: a ``sentinel://`` URL asks
the sentinels for the current primary before each new connection (redis-py's Sentinel pool),
and a ``rediss://`` URL checks the server's certificate against ``broker_ca_file``.

A Sentinel broker URL lists the sentinels, separated by ``;``, as kombu reads it::

    sentinel://:PASSWORD@host1:26379/0;sentinel://host2:26379;sentinel://host3:26379

The password and database of the first entry are the primary's (the sentinels themselves are
asked without a password); the primary's name is ``broker_master_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from broker.errors import ConfigError
from broker.settings import CorralSettings, redacted_url

SENTINEL_SCHEME = "sentinel://"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Where the sentinels are and what to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str, master_name: str) -> SentinelTarget:
    """The sentinels of a ``sentinel://h1:p1;sentinel://h2:p2/db`` URL; a clear error (the
    password left out) when it is malformed."""
    sentinels: list[tuple[str, int]] = []
    first = None
    for entry in url.split(";"):
        part = entry.strip()
        if not part.startswith(SENTINEL_SCHEME):
            raise ConfigError(
                f"every entry of a Sentinel broker URL starts with sentinel://, got"
                f" {redacted_url(part)!r}"
            )
        try:
            pieces = urlsplit(part)
            host, port = pieces.hostname, pieces.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"bad Sentinel address in {redacted_url(part)!r}") from None
        if not host:
            raise ConfigError(f"a Sentinel entry has no host: {redacted_url(part)!r}")
        sentinels.append((host, port))
        first = first or pieces
    assert first is not None  # split() yields at least one part
    db_text = first.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"the database of a Sentinel broker URL is a number, got {db_text!r}")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master_name=master_name,
        db=int(db_text),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
    )


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def _broker(source: CorralSettings | str) -> tuple[str, str | None, str]:
    """(URL, CA file, Sentinel primary name) from settings or a bare URL."""
    if isinstance(source, str):
        return source, None, CorralSettings.model_fields["broker_master_name"].default
    url = source.broker_url.get_secret_value()
    return url, source.broker_ca_file, source.broker_master_name


def _tls_options(url: str, ca_file: str | None) -> dict[str, Any]:
    # A CA file means the server's certificate is checked against it (and its name against
    # the URL's host); without one, rediss:// checks against the system's trusted CAs.
    if url.startswith("rediss://") and ca_file:
        return {"ssl_ca_certs": ca_file, "ssl_cert_reqs": "required"}
    return {}


def _no_primary(sentinels: list[Any], service_name: str) -> redis.sentinel.MasterNotFoundError:
    # redis-py's message lists the repr of every sentinel connection (kilobytes of pool
    # internals); this one says what a user can act on.
    asked = ", ".join(
        f"{s.connection_pool.connection_kwargs.get('host')}:"
        f"{s.connection_pool.connection_kwargs.get('port')}"
        for s in sentinels
    )
    return redis.sentinel.MasterNotFoundError(
        f"no sentinel ({asked}) names a reachable primary {service_name!r}: are the"
        " sentinels up, and is broker_master_name right?"
    )


class _Sentinel(redis.sentinel.Sentinel):
    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)  # type: ignore[no-untyped-call]
        except redis.sentinel.MasterNotFoundError:
            raise _no_primary(self.sentinels, service_name) from None


class _AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except redis.sentinel.MasterNotFoundError:
            raise _no_primary(self.sentinels, service_name) from None


class _SentinelPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's Sentinel pool, which also closes its connections to the sentinels when it
    is disconnected (redis-py leaves them open: a closed client leaked a socket each)."""

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        super().disconnect(*args, **kwargs)
        for sentinel in self.sentinel_manager.sentinels:
            sentinel.close()


class _BlockingSentinelPool(_SentinelPool, redis.BlockingConnectionPool):
    """A Sentinel pool that, past its size, waits for a connection instead of failing
    (redis-py has the two separately: Sentinel's address lookup, the blocking pool's queue)."""


class _AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """The asyncio twin of ``_SentinelPool``."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


class _AsyncBlockingSentinelPool(_AsyncSentinelPool, redis.asyncio.BlockingConnectionPool):
    """The asyncio twin of ``_BlockingSentinelPool``."""


def sync_pool(
    source: CorralSettings | str,
    *,
    max_connections: int,
    blocking_timeout_s: float | None = None,
    **options: Any,
) -> redis.ConnectionPool:
    """A connection pool to the broker. ``blocking_timeout_s`` set: a caller past
    ``max_connections`` waits that long for a connection; unset: it gets an error at once."""
    url, ca_file, master_name = _broker(source)
    if blocking_timeout_s is not None:
        options["timeout"] = blocking_timeout_s
    if is_sentinel_url(url):
        target = parse_sentinel_url(url, master_name)
        manager = _Sentinel(
            list(target.sentinels), socket_connect_timeout=options.get("socket_connect_timeout")
        )  # type: ignore[no-untyped-call]
        pool_class = _BlockingSentinelPool if blocking_timeout_s is not None else _SentinelPool
        pool: redis.ConnectionPool = pool_class(
            target.master_name,
            manager,
            is_master=True,
            db=target.db,
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            **options,
        )  # type: ignore[no-untyped-call]
        return pool
    pool_type = (
        redis.BlockingConnectionPool if blocking_timeout_s is not None else redis.ConnectionPool
    )
    return pool_type.from_url(
        url, max_connections=max_connections, **_tls_options(url, ca_file), **options
    )


def sync_client(
    source: CorralSettings | str,
    *,
    max_connections: int = 16,
    blocking_timeout_s: float | None = None,
    **options: Any,
) -> redis.Redis:
    """A client that owns its pool (``close()`` releases it)."""
    pool = sync_pool(
        source, max_connections=max_connections, blocking_timeout_s=blocking_timeout_s, **options
    )
    return redis.Redis.from_pool(pool)


def async_pool(
    source: CorralSettings | str,
    *,
    max_connections: int,
    blocking_timeout_s: float | None = None,
    **options: Any,
) -> redis.asyncio.ConnectionPool:
    """The asyncio twin of ``sync_pool``."""
    url, ca_file, master_name = _broker(source)
    if blocking_timeout_s is not None:
        options["timeout"] = blocking_timeout_s
    if is_sentinel_url(url):
        target = parse_sentinel_url(url, master_name)
        manager = _AsyncSentinel(
            list(target.sentinels), socket_connect_timeout=options.get("socket_connect_timeout")
        )  # type: ignore[no-untyped-call]
        pool_class = (
            _AsyncBlockingSentinelPool if blocking_timeout_s is not None else _AsyncSentinelPool
        )
        pool: redis.asyncio.ConnectionPool = pool_class(
            target.master_name,
            manager,
            is_master=True,
            db=target.db,
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            **options,
        )  # type: ignore[no-untyped-call]
        return pool
    pool_type = (
        redis.asyncio.BlockingConnectionPool
        if blocking_timeout_s is not None
        else redis.asyncio.ConnectionPool
    )
    return pool_type.from_url(
        url, max_connections=max_connections, **_tls_options(url, ca_file), **options
    )


def async_client(
    source: CorralSettings | str,
    *,
    max_connections: int = 16,
    blocking_timeout_s: float | None = None,
    **options: Any,
) -> redis.asyncio.Redis:
    """An asyncio client that owns its pool (``aclose()`` releases it)."""
    pool = async_pool(
        source, max_connections=max_connections, blocking_timeout_s=blocking_timeout_s, **options
    )
    return redis.asyncio.Redis.from_pool(pool)


def decoded(value: bytes | str) -> str:
    """A reply's text: redis-py answers bytes unless a client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "SentinelTarget",
    "async_client",
    "async_pool",
    "decoded",
    "is_sentinel_url",
    "parse_sentinel_url",
    "sync_client",
    "sync_pool",
]
