"""``corral doctor``'s checks: the broker, Flower and this machine's tunnels (nodes: node_health).

Each check is a ``Check`` with a status and, when something needs fixing, the fix in words a
user can act on. Checks only read: nothing here changes the cluster.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import redis.exceptions

from broker.redis_clients import sync_client
from broker.settings import CorralSettings, redacted_url
from controller.tunnel import TunnelState, read_tunnel_states

MIN_REDIS = (6, 2)
"""Oldest Redis corral runs on (its Lua scripts and commands); 7 is what it is tested with."""
TESTED_REDIS_MAJOR = 7


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    area: str
    """What was checked: ``broker``, ``node alpha``, ``flower``, ``tunnel …``, ``probe``."""
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def needs_fixing(checks: list[Check]) -> bool:
    return any(check.status is Status.FAIL for check in checks)


# --- the broker ----------------------------------------------------------------------------


def check_broker(settings: CorralSettings) -> tuple[list[Check], redis.Redis | None]:
    """Reachability, auth, persistence, eviction, memory and version; the client when it
    answered (node checks read through it)."""
    url = settings.broker_url.get_secret_value()
    shown = redacted_url(url)
    client = sync_client(settings, max_connections=4, socket_connect_timeout=3, socket_timeout=5)
    started = time.perf_counter()
    try:
        client.ping()
    except redis.exceptions.AuthenticationError as exc:
        client.close()
        return [_auth_failure(shown, str(exc))], None
    except redis.exceptions.ResponseError as exc:
        client.close()
        if "AUTH" in str(exc):  # NOAUTH, or a password given to a server without one
            return [_auth_failure(shown, str(exc))], None
        return [Check("broker", "reachable", Status.FAIL, f"{shown} refused PING: {exc}")], None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        client.close()
        return [
            Check(
                "broker",
                "reachable",
                Status.FAIL,
                f"cannot reach {shown}: {exc}",
                "start redis-server there, or point CORRAL_BROKER_URL (or --broker) at it; "
                "on a node behind SSH, start `corral tunnel` first",
            )
        ], None
    ms = (time.perf_counter() - started) * 1000
    checks = [Check("broker", "reachable", Status.OK, f"{shown} answered in {ms:.1f} ms")]
    checks.append(_auth_check(url))
    try:
        info = client.info()
    except redis.exceptions.RedisError as exc:
        # A least-privilege controller user (``corral acl``) has no INFO: a sound setup, so a
        # warning that says how to look further, not a failure.
        checks.append(
            Check(
                "broker",
                "info",
                Status.WARN,
                f"this user may not run INFO ({exc}): version, persistence, eviction and "
                "memory were not checked",
                "run `corral --broker redis://ADMIN:PASSWORD@HOST:6379/0 doctor` with an "
                "admin user to check them",
            )
        )
        return checks, client
    checks += [_version_check(info), _aof_check(info), _eviction_check(info), _memory_check(info)]
    return checks, client


def _auth_failure(shown: str, error: str) -> Check:
    return Check(
        "broker",
        "auth",
        Status.FAIL,
        f"{shown} refused the credentials: {error}",
        "put the password of redis.conf's requirepass in the URL: "
        "redis://:PASSWORD@HOST:6379/0 (read from ${REDIS_PASSWORD} in corral.yaml)",
    )


def _auth_check(url: str) -> Check:
    parts = urlsplit(url)
    if parts.password:
        return Check("broker", "auth", Status.OK, "password accepted")
    host = parts.hostname or ""
    if host in ("127.0.0.1", "::1", "localhost") or parts.scheme == "unix":
        return Check("broker", "auth", Status.OK, "no password (loopback only)")
    return Check(
        "broker",
        "auth",
        Status.WARN,
        f"no password: anyone who can reach {host} can read every prompt and answer",
        "set requirepass in redis.conf and put it in CORRAL_BROKER_URL",
    )


def _version_check(info: dict[str, Any]) -> Check:
    version = str(info.get("redis_version", "0"))
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_REDIS:
        return Check(
            "broker",
            "version",
            Status.FAIL,
            f"Redis {version} is older than corral needs ({MIN_REDIS[0]}.{MIN_REDIS[1]})",
            f"upgrade to Redis {TESTED_REDIS_MAJOR}",
        )
    if numbers[0] < TESTED_REDIS_MAJOR:
        return Check(
            "broker",
            "version",
            Status.WARN,
            f"Redis {version} works; corral is tested on {TESTED_REDIS_MAJOR}",
            f"upgrade to Redis {TESTED_REDIS_MAJOR} when convenient",
        )
    return Check("broker", "version", Status.OK, f"Redis {version}")


def _aof_check(info: dict[str, Any]) -> Check:
    if not int(info.get("aof_enabled", 0)):
        return Check(
            "broker",
            "persistence",
            Status.FAIL,
            "AOF is off: a Redis restart loses every queued job, lease and replay log",
            "`redis-cli CONFIG SET appendonly yes`, and `appendonly yes` in redis.conf",
        )
    if info.get("aof_last_write_status", "ok") != "ok":
        return Check(
            "broker",
            "persistence",
            Status.FAIL,
            f"AOF is on but its last write failed ({info.get('aof_last_write_status')})",
            "check the disk under Redis's dir (full? read-only?) and redis.log",
        )
    return Check("broker", "persistence", Status.OK, "AOF on (appendonly yes)")


def _eviction_check(info: dict[str, Any]) -> Check:
    policy = str(info.get("maxmemory_policy", "unknown"))
    if policy != "noeviction":
        return Check(
            "broker",
            "eviction",
            Status.FAIL,
            f"maxmemory-policy is {policy}: when memory runs short Redis would silently delete "
            "queued jobs, leases and heartbeats",
            "`redis-cli CONFIG SET maxmemory-policy noeviction`, and "
            "`maxmemory-policy noeviction` in redis.conf",
        )
    return Check("broker", "eviction", Status.OK, "maxmemory-policy noeviction")


def _memory_check(info: dict[str, Any]) -> Check:
    used = int(info.get("used_memory", 0))
    limit = int(info.get("maxmemory", 0))
    if limit:
        share = used / limit
        detail = f"{_mb(used)} used of maxmemory {_mb(limit)} ({share:.0%})"
        if share >= 0.9:
            return Check(
                "broker",
                "memory",
                Status.FAIL,
                detail + ": new jobs will soon be refused (OOM)",
                "raise maxmemory, or shorten replay_ttl_s so finished jobs' logs expire sooner",
            )
        if share >= 0.75:
            return Check(
                "broker", "memory", Status.WARN, detail, "raise maxmemory before it fills up"
            )
        return Check("broker", "memory", Status.OK, detail)
    system = int(info.get("total_system_memory", 0))
    if system and used / system >= 0.5:
        return Check(
            "broker",
            "memory",
            Status.WARN,
            f"{_mb(used)} used, over half the machine's {_mb(system)}, and no maxmemory set",
            "set maxmemory in redis.conf so Redis refuses writes before the OOM killer acts",
        )
    of_system = f" of the machine's {_mb(system)}" if system else ""
    return Check("broker", "memory", Status.OK, f"{_mb(used)} used{of_system}, no maxmemory")


def _mb(size: int) -> str:
    if size >= 1024**3:
        return f"{size / 1024**3:.1f} GB"
    return f"{size / 1024**2:.1f} MB"


# --- Flower and tunnels --------------------------------------------------------------------


def check_flower(url: str | None, credentials: str | None) -> list[Check]:
    if not url:
        return [
            Check(
                "flower",
                "configured",
                Status.SKIP,
                "skipped: no Flower URL (give --flower URL or set CORRAL_FLOWER_URL)",
            )
        ]
    base = url.rstrip("/")
    shown = redacted_url(base)
    try:
        # The dashboard, not the API: Flower 2 refuses its API to anonymous callers even with
        # no auth configured (unless FLOWER_UNAUTHENTICATED_API), so only a page tells.
        anonymous = httpx.get(f"{base}/", timeout=5)
    except httpx.HTTPError as exc:
        return [
            Check(
                "flower",
                "reachable",
                Status.FAIL,
                f"{shown} does not answer: {exc}",
                "start it with `corral flower` (CORRAL_FLOWER_AUTH=user:password set)",
            )
        ]
    checks = [Check("flower", "reachable", Status.OK, f"{shown} answers")]
    if anonymous.status_code != 401 and not anonymous.is_redirect:  # a redirect: OAuth login
        checks.append(
            Check(
                "flower",
                "auth",
                Status.FAIL,
                f"answers without credentials (HTTP {anonymous.status_code}): anyone who can "
                "reach it can watch and cancel jobs",
                "restart it with `corral flower` and CORRAL_FLOWER_AUTH=user:password",
            )
        )
        return checks
    if not credentials:
        checks.append(Check("flower", "auth", Status.OK, "asks for credentials (HTTP 401)"))
        return checks
    user, _, password = credentials.split(",")[0].partition(":")
    try:
        status = httpx.get(f"{base}/api/workers", auth=(user, password), timeout=5).status_code
    except httpx.HTTPError as exc:
        status = 0
        checks.append(Check("flower", "auth", Status.FAIL, f"no answer with credentials: {exc}"))
        return checks
    if status == 200:
        checks.append(
            Check("flower", "auth", Status.OK, "asks for credentials; CORRAL_FLOWER_AUTH works")
        )
    else:
        checks.append(
            Check(
                "flower",
                "auth",
                Status.FAIL,
                f"CORRAL_FLOWER_AUTH is refused (HTTP {status})",
                "set CORRAL_FLOWER_AUTH to the user:password Flower was started with",
            )
        )
    return checks


def check_tunnels(states: list[TunnelState] | None = None) -> list[Check]:
    tunnels = read_tunnel_states() if states is None else states
    if not tunnels:
        return [Check("tunnels", "configured", Status.SKIP, "skipped: no tunnel on this machine")]
    checks = []
    for tunnel in tunnels:
        area = f"tunnel {tunnel.via}"
        since = time.strftime("%H:%M:%S", time.localtime(tunnel.since))
        alive = _process_alive(tunnel.pid)
        if tunnel.state == "up" and alive:
            checks.append(
                Check(
                    area,
                    "up",
                    Status.OK,
                    f"up since {since} ({tunnel.reconnects} reconnects): "
                    + "; ".join(tunnel.forwards),
                )
            )
            continue
        if tunnel.state == "stopped":
            detail = f"not running: stopped at {since}"
        elif tunnel.state == "failed":
            detail = f"gave up at {since}: {tunnel.reason}"
        elif not alive:
            detail = (
                f"not running: its process (pid {tunnel.pid}) is gone, {tunnel.state} at {since}"
            )
        else:
            reason = f": {tunnel.reason}" if tunnel.reason else ""
            detail = f"{tunnel.state} since {since}{reason}"
        checks.append(
            Check(
                area,
                "up",
                Status.FAIL,
                detail,
                f"start it again (`corral tunnel --via {tunnel.via.rsplit(':', 1)[0]} …`) "
                "and check that the SSH host answers"
                + (f"; if it is retired, delete {tunnel.state_file}" if tunnel.state_file else ""),
            )
        )
    return checks


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True
