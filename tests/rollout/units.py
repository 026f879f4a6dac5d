"""Reading systemd unit files and environment files the way systemd does (the parts corral uses).

The rollout tests start processes exactly as the rendered units would: the same ExecStart,
Environment= and EnvironmentFile=, and the same stop signal.
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

from tests.support.servers import REPO_ROOT

WORKER_UNIT_TEMPLATE = (
    REPO_ROOT / "ansible" / "roles" / "corral_worker" / "templates" / "corral-worker.service.j2"
)


def unit_directives(text: str, section: str = "Service") -> list[tuple[str, str]]:
    """(key, value) pairs of one section, in order; comments and blank lines skipped."""
    pairs: list[tuple[str, str]] = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == section and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def directive(text: str, key: str, section: str = "Service") -> str:
    values = [v for k, v in unit_directives(text, section) if k == key]
    assert len(values) == 1, f"expected one {key}= in [{section}], found {values}"
    return values[0]


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (quotes stripped)."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def service_environment(unit_text: str) -> dict[str, str]:
    """What the unit's process gets on top of systemd's own: Environment= then
    EnvironmentFile= (later settings win, as in systemd)."""
    env: dict[str, str] = {}
    for key, value in unit_directives(unit_text):
        if key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = val
        elif key == "EnvironmentFile":
            path = Path(value.removeprefix("-"))
            env.update(parse_environment_file(path.read_text()))
    return env


def exec_start(unit_text: str) -> list[str]:
    return shlex.split(directive(unit_text, "ExecStart"))


def kill_signal(unit_text: str) -> signal.Signals:
    """The signal ``systemctl stop`` sends first (systemd's default is SIGTERM)."""
    values = [v for k, v in unit_directives(unit_text) if k == "KillSignal"]
    return signal.Signals[values[-1]] if values else signal.SIGTERM
