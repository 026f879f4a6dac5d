"""The running configuration, swapped whole when ``corral.yaml`` changes (hot reload).

A long-lived controller (the gateway, the MCP server, ``corral chat``) holds one
``ConfigWatch`` and reads ``current()`` at each decision, never a copy kept from start-up.
``poll()`` looks at the file's mtime, inode and size (a ``stat``: microseconds, so servers
call it every second and the chat before each prompt) and, when they changed, builds a new
``CorralSettings`` with the same models and sources as at start-up. A valid edit replaces the
settings object in one assignment (readers see the old object or the new one, never a mix);
an invalid one is refused: the last good settings stay, and ``problem`` says why.

Polling rather than inotify (``watchfiles``): one ``stat`` a second costs nothing, needs no
extra dependency or thread, works on every filesystem (NFS, bind mounts, editors that save
by renaming a new file over the old), and the chat's blocking REPL can poll in its own loop.

Some settings shape connections and pools made once at start-up (the broker URL, breaker and
TTL sizes): a change to one of those is kept for the next start, and logged as such, so
``current()`` always describes what the process really does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.settings import CorralSettings, build_settings, config_path

log = logging.getLogger("corral.config")

RESTART_ONLY = frozenset(
    {
        "broker_url",
        "broker_ca_file",
        "broker_master_name",
        "heartbeat_interval_s",
        "task_events",
        "visibility_timeout_s",
        "breaker_threshold",
        "breaker_cooldown_s",
        "replay_ttl_s",
        "session_ttl_s",
        "otlp_endpoint",
    }
)
"""Fields read once when clients, pools and Celery are made; an edit waits for a restart."""

DEFAULT_POLL_S = 1.0

Listener = Callable[[CorralSettings, CorralSettings], None]
"""Called with (old, new) after a valid edit is swapped in."""


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    inode: int
    size: int


def _stamp(path: Path) -> _FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_ino, st.st_size)


def watched_path() -> Path:
    """The file a reload reads: ``CORRAL_CONFIG``, else ``./corral.yaml`` (absolute, so a
    later ``chdir`` does not move it), whether or not it exists yet."""
    found = config_path()
    explicit = os.environ.get("CORRAL_CONFIG")
    return (found or Path(explicit or "corral.yaml")).absolute()


class ConfigWatch:
    """The settings in force, and the file they came from.

    ``overrides``: the command-line flags given at start-up; they keep winning over the file.
    """

    def __init__(
        self,
        settings: CorralSettings,
        path: Path | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self._settings = settings
        self.path = path
        self.poll_s = poll_s
        self._overrides = dict(overrides or {})
        self._stamp = _stamp(path) if path is not None else None
        self._listeners: dict[object, Listener] = {}
        self.problem: str | None = None
        """Why the last edit was refused; ``None`` once the file holds a valid config."""
        self.reloaded_at: float | None = None
        """Wall-clock time of the last accepted edit (``None``: as started)."""

    @classmethod
    def from_environment(cls, **cli_overrides: Any) -> ConfigWatch:
        """Build the settings as ``main()`` does and watch the file they were read from."""
        given = {k: v for k, v in cli_overrides.items() if v is not None}
        return cls(build_settings(**given), watched_path(), overrides=given)

    def current(self) -> CorralSettings:
        """The settings in force now: read it at each decision, do not keep it."""
        return self._settings

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(old, new)`` after each accepted edit; returns an unsubscribe."""
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    def poll(self) -> bool:
        """Reload if the file changed since the last look; True when new settings took over."""
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp is None:
            self._refuse(f"{self.path} is gone; keeping the last good config")
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read the file now; swap in what it says if it is valid, else keep the old."""
        old = self._settings
        try:
            fresh = build_settings(**self._overrides)
        except ConfigError as exc:
            self._refuse(str(exc))
            return False
        kept = {name: getattr(old, name) for name in RESTART_ONLY if name in type(old).model_fields}
        waiting = sorted(n for n, v in kept.items() if getattr(fresh, n) != v)
        if waiting:
            log.warning(
                "corral.yaml: %s changed; that takes effect when this process restarts",
                ", ".join(waiting),
            )
        new = fresh.model_copy(update=kept)
        self.problem = None
        if new == old:
            return False
        self._settings = new
        self.reloaded_at = time.time()
        log.warning("corral.yaml reloaded: %s", ", ".join(changed_fields(old, new)))
        for listener in list(self._listeners.values()):
            listener(old, new)
        return True

    def _refuse(self, reason: str) -> None:
        if reason != self.problem:
            log.error("corral.yaml edit refused (the last good config stays): %s", reason)
        self.problem = reason

    async def run(self) -> None:
        """Poll every ``poll_s`` until cancelled (a server's background task)."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.poll()
            except Exception:
                log.exception("config reload failed")


def changed_fields(old: CorralSettings, new: CorralSettings) -> list[str]:
    """Names of the settings that differ (never their values: some hold secrets)."""
    return [name for name in type(new).model_fields if getattr(old, name) != getattr(new, name)]


__all__ = ["RESTART_ONLY", "ConfigWatch", "changed_fields", "watched_path"]
