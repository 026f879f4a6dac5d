"""An SSH tunnel from a node to the broker, without a VPN: forward, watch, reconnect.

``run_tunnel`` opens an asyncssh connection to ``user@host``, forwards a local port to the
broker's port as the SSH host sees it (and, where asked, a port on the SSH host back to a
local backend), and when the link drops reconnects with exponential backoff and jitter. Each
state change is logged and written to a small JSON state file that ``corral doctor`` reads.

Host keys are always checked against a known_hosts file: there is no switch that turns the
check off. A host key that does not match, a key file that cannot be read and a key the server
refuses are configuration errors (``ConfigError``): retrying would not fix them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncssh

from broker.errors import ConfigError

log = logging.getLogger("corral.tunnel")

DEFAULT_SSH_PORT = 22
DEFAULT_BROKER_PORT = 6379
STATE_DIR_ENV = "CORRAL_STATE_DIR"

_VIA = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@:\s\[\]]+)(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class Forward:
    """A port on one side of the tunnel that leads to ``dest_host:dest_port`` on the other."""

    listen_host: str
    listen_port: int
    dest_host: str
    dest_port: int

    def describe_local(self, ssh_host: str) -> str:
        return (
            f"{self.listen_host}:{self.listen_port} here → "
            f"{self.dest_host}:{self.dest_port} from {ssh_host}"
        )

    def describe_reverse(self, ssh_host: str) -> str:
        return (
            f"{self.listen_host}:{self.listen_port} on {ssh_host} → "
            f"{self.dest_host}:{self.dest_port} here"
        )


@dataclass(frozen=True)
class TunnelConfig:
    host: str
    port: int
    user: str | None
    known_hosts: Path
    identity: Path | None
    local: tuple[Forward, ...]
    """Local port -> a port the SSH host can reach (the broker)."""
    reverse: tuple[Forward, ...] = ()
    """A port on the SSH host -> a local one (a backend the controller should reach)."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    keepalive_interval_s: float = 2.0
    keepalive_count_max: int = 2
    """A link that goes silent (a cable pulled, no RST) is noticed after about 6 s (a
    keepalive after 2 s of silence, then two unanswered): by SSH, not TCP's own timers, which
    take minutes (measured: 6.0 s; with a count of 3 it was 8.0 s)."""
    connect_timeout_s: float = 10.0
    state_file: Path | None = None

    @property
    def target(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


@dataclass
class TunnelState:
    """What ``corral doctor`` reads: the tunnel's state now and since when."""

    via: str
    state: str  # connecting | up | down | stopped | failed (gave up: retrying cannot help)
    since: float
    pid: int
    reason: str | None = None
    reconnects: int = 0
    forwards: list[str] = field(default_factory=list)
    state_file: str | None = None


def parse_via(value: str) -> tuple[str | None, str, int]:
    """``user@host[:port]`` (``[::1]:2222`` for an IPv6 address) -> (user, host, port)."""
    match = _VIA.match(value.strip())
    if match is None:
        raise ConfigError(f"--via must look like user@host or user@host:port, not {value!r}")
    port = int(match["port"]) if match["port"] else DEFAULT_SSH_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"--via: port {port} is out of range")
    return match["user"], match["host"].strip("[]"), port


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def parse_reverse(value: str) -> Forward:
    """``REMOTE_PORT:LOCAL_HOST:LOCAL_PORT`` (as ``ssh -R``): the SSH host's loopback port
    ``REMOTE_PORT`` leads to ``LOCAL_HOST:LOCAL_PORT`` on this machine."""
    remote, sep, rest = value.partition(":")
    if not sep or not remote.isdigit() or not 0 < int(remote) < 65536:
        raise ConfigError(f"--reverse must be REMOTE_PORT:LOCAL_HOST:LOCAL_PORT, not {value!r}")
    host, port = parse_host_port(rest, "--reverse's local side")
    return Forward("127.0.0.1", int(remote), host, port)


def state_dir() -> Path:
    """Where running tunnels leave their state (``CORRAL_STATE_DIR``, default
    ``~/.local/state/corral``)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    return Path(explicit) if explicit else Path.home() / ".local" / "state" / "corral"


def default_state_file(host: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}_{port}")
    return state_dir() / "tunnels" / f"{safe}.json"


def read_tunnel_states(directory: Path | None = None) -> list[TunnelState]:
    """Every tunnel state file under ``directory`` (default: ``state_dir()/tunnels``)."""
    folder = directory or state_dir() / "tunnels"
    states = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            states.append(TunnelState(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable tunnel state %s", path)
    return states


def load_known_hosts(path: Path) -> asyncssh.SSHKnownHosts:
    try:
        return asyncssh.read_known_hosts(str(path))
    except FileNotFoundError:
        raise ConfigError(
            f"known_hosts file {path} does not exist: add the host's key to it (check the "
            "fingerprint with the host's owner first, e.g. `ssh-keyscan HOST` and "
            "`ssh-keygen -lf`)"
        ) from None
    except (OSError, ValueError, asyncssh.Error) as exc:
        raise ConfigError(f"cannot read known_hosts file {path}: {exc}") from None


def load_identity(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        raise ConfigError(f"identity file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"identity file {path} cannot be read (permission denied)") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
        if "passphrase" in str(exc).lower():
            raise ConfigError(
                f"identity file {path} is protected by a passphrase: load it into ssh-agent "
                "and leave out --identity, or use a key made for this tunnel"
            ) from None
        raise ConfigError(
            f"identity file {path} is not a private key corral can read ({exc}); give the "
            "private half (id_ed25519), not the .pub file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"identity file {path} cannot be read: {exc}") from None


class _Client(asyncssh.SSHClient):
    """Remembers the key the server presented, so a refusal can name its fingerprint, and
    why the connection ended."""

    def __init__(self) -> None:
        self.presented_key: asyncssh.SSHKey | None = None
        self.lost_reason: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Called only for a key known_hosts does not trust: record it and refuse it.
        self.presented_key = key
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = str(exc) if exc else "closed by the server"


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: the ceiling doubles per failed attempt up to
    ``max_s``, and the delay is drawn from its upper half, so nodes that lost the same
    server do not all return at the same instant."""
    ceiling = min(max_s, initial_s * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


class Tunnel:
    """One tunnel's connect-forward-wait-reconnect loop (``run``), reporting each state."""

    def __init__(
        self,
        config: TunnelConfig,
        *,
        on_state: Callable[[TunnelState], None] | None = None,
    ) -> None:
        self.config = config
        self._known_hosts = load_known_hosts(config.known_hosts)
        self._keys = [load_identity(config.identity)] if config.identity else None
        self._on_state = on_state
        self._reconnects = 0
        forwards = [f.describe_local(config.host) for f in config.local]
        forwards += [f.describe_reverse(config.host) for f in config.reverse]
        self.state = TunnelState(
            via=config.target,
            state="connecting",
            since=time.time(),
            pid=os.getpid(),
            forwards=forwards,
            state_file=str(config.state_file) if config.state_file else None,
        )

    def _set(self, state: str, reason: str | None = None) -> None:
        self.state.state, self.state.since, self.state.reason = state, time.time(), reason
        self.state.reconnects = self._reconnects
        suffix = f": {reason}" if reason else ""
        if state == "up":
            suffix = ": " + "; ".join(self.state.forwards)
        log.info("tunnel %s %s%s", self.config.target, state, suffix)
        if self.config.state_file is not None:
            path = self.config.state_file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.state)))
            tmp.replace(path)
        if self._on_state is not None:
            self._on_state(self.state)

    async def run(self) -> None:
        """Keep the tunnel up until cancelled; raises ConfigError for what retrying cannot fix."""
        failures = 0
        ending = "stopped"
        try:
            while True:
                self._set("connecting")
                try:
                    await self._serve_once()
                    failures = 0  # it was up: the next outage starts the backoff afresh
                except OSError as exc:  # refused, unreachable, reset
                    self._set("down", f"cannot connect: {exc.strerror or exc}")
                except (asyncssh.Error, TimeoutError) as exc:
                    self._set("down", str(exc) or type(exc).__name__)
                delay = backoff_delay(
                    failures, self.config.backoff_initial_s, self.config.backoff_max_s
                )
                failures += 1
                self._reconnects += 1
                log.info("tunnel %s retrying in %.1f s", self.config.target, delay)
                await asyncio.sleep(delay)
        except ConfigError as exc:
            ending = "failed"  # doctor shows why: a refused host key, a refused key file
            self.state.reason = str(exc)
            raise
        finally:
            self._set(ending, self.state.reason if ending == "failed" else None)

    async def _serve_once(self) -> None:
        config = self.config
        client = _Client()
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    config.host,
                    config.port,
                    username=config.user,
                    known_hosts=self._known_hosts,
                    client_keys=self._keys if self._keys is not None else (),
                    client_factory=lambda: client,
                    keepalive_interval=config.keepalive_interval_s,
                    keepalive_count_max=config.keepalive_count_max,
                    # ~/.ssh/config could weaken the checks above; this tunnel stands alone.
                    config=None,
                ),
                config.connect_timeout_s,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise ConfigError(self._host_key_message(client)) from None
        except asyncssh.PermissionDenied:
            key = f"the key in {config.identity}" if config.identity else "every key offered"
            raise ConfigError(
                f"{config.target} refused {key} for user {config.user or '(default)'}: add its "
                "public half to that user's ~/.ssh/authorized_keys on the host"
            ) from None
        async with conn:
            for forward in config.local:
                try:
                    await conn.forward_local_port(
                        forward.listen_host,
                        forward.listen_port,
                        forward.dest_host,
                        forward.dest_port,
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {forward.listen_host}:{forward.listen_port}: "
                        f"{exc.strerror or exc}"
                    ) from None
            for forward in config.reverse:
                try:
                    await conn.forward_remote_port(
                        forward.listen_host,
                        forward.listen_port,
                        forward.dest_host,
                        forward.dest_port,
                    )
                except asyncssh.ChannelListenError as exc:
                    raise ConfigError(
                        f"{config.host} would not listen on port {forward.listen_port} for "
                        f"the reverse forward: {exc}"
                    ) from None
            self._set("up")
            await conn.wait_closed()
        self._set("down", client.lost_reason or "connection closed")

    def _host_key_message(self, client: _Client) -> str:
        config = self.config
        key = client.presented_key
        shown = (
            f"{key.get_algorithm()} key {key.get_fingerprint('sha256')}"
            if key is not None
            else "a key"
        )
        return (
            f"host key refused: {config.host} (port {config.port}) presented {shown}, which "
            f"{config.known_hosts} does not trust. If the host was re-installed or re-keyed, "
            "check that fingerprint with its owner and update known_hosts; otherwise something "
            "may be impersonating it"
        )
