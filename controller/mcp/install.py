"""``corral mcp install``: the config entry that makes an MCP host start corral's server.

Each host keeps its servers under ``mcpServers`` in one JSON file. ``install`` prints the entry,
or with ``--write`` merges it into the file (other servers and settings are kept, a second run
changes nothing); ``uninstall`` takes it out again. A file that is not valid JSON is left alone.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from broker.errors import ConfigError
from broker.settings import CorralSettings, redacted_url

Host = Literal["claude-code", "claude-desktop", "cursor"]
HOSTS: tuple[Host, ...] = ("claude-code", "claude-desktop", "cursor")
SERVER_NAME = "corral"


def config_path(host: Host, home: Path, platform: str = sys.platform) -> Path:
    """Where ``host`` keeps its MCP servers for this user (all projects)."""
    if host == "claude-code":
        return home / ".claude.json"
    if host == "cursor":
        return home / ".cursor" / "mcp.json"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if platform == "win32":
        appdata = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming"))
        return appdata / "Claude" / "claude_desktop_config.json"
    return home / ".config" / "Claude" / "claude_desktop_config.json"


def server_entry(
    host: Host, settings: CorralSettings, python: str = sys.executable
) -> dict[str, Any]:
    """Start the server with this interpreter (hosts run with a bare PATH), stdio transport.

    The broker URL goes in only without a password: a secret is never written to a host's
    config; such a node reads it from ``CORRAL_BROKER_URL`` or corral.yaml's ``${VAR}``.
    """
    entry: dict[str, Any] = {"command": python, "args": ["-m", "controller.mcp"]}
    if host == "claude-code":
        entry = {"type": "stdio", **entry}
    url = settings.broker_url.get_secret_value()
    if redacted_url(url) == url:
        entry["env"] = {"CORRAL_BROKER_URL": url}
        # How to reach that broker goes along with it (neither is a secret).
        if settings.broker_ca_file:
            entry["env"]["CORRAL_BROKER_CA_FILE"] = settings.broker_ca_file
        if url.startswith("sentinel://"):
            entry["env"]["CORRAL_BROKER_MASTER_NAME"] = settings.broker_master_name
    return entry


@dataclass(frozen=True)
class Change:
    path: Path
    changed: bool
    message: str


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text() or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): left as it is"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a JSON object: left as it is")
    return document


def _write(path: Path, document: dict[str, Any]) -> None:
    """Write beside, then rename: a host reading the file never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".corral-tmp")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)


def install(path: Path, entry: dict[str, Any]) -> Change:
    document = _read(path)
    servers = document.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise ConfigError(f"{path}: mcpServers is not a JSON object: left as it is")
    if servers.get(SERVER_NAME) == entry:
        return Change(path, False, f"corral is already in {path}")
    servers[SERVER_NAME] = entry
    _write(path, document)
    return Change(path, True, f"added corral to {path}; restart the host to load it")


def uninstall(path: Path) -> Change:
    document = _read(path)
    servers = document.get("mcpServers")
    if not isinstance(servers, dict) or SERVER_NAME not in servers:
        return Change(path, False, f"corral is not in {path}")
    del servers[SERVER_NAME]
    _write(path, document)
    return Change(path, True, f"removed corral from {path}")


def snippet(entry: dict[str, Any]) -> str:
    return json.dumps({"mcpServers": {SERVER_NAME: entry}}, indent=2)
