"""``corral mcp install / uninstall``: each host's config file, in a temporary HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mcp.server.transport_security import TransportSecurityMiddleware

from controller.localcluster import free_port
from controller.mcp.main import main, transport_security
from tests.support.servers import REPO_ROOT

PASSWORDLESS = "redis://127.0.0.1:6390/3"


def corral_mcp(
    home: Path, *args: str, broker: str = PASSWORDLESS
) -> subprocess.CompletedProcess[str]:
    """The real command line: ``corral mcp ...`` execs ``python -m controller.mcp ...``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run(
        [sys.executable, "-m", "controller", "mcp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "HOME": str(home), "CORRAL_BROKER_URL": broker, "PYTHONPATH": str(REPO_ROOT)},
        cwd=home,
    )


def mcp_command(home: Path, *args: str, broker: str = PASSWORDLESS) -> Result:
    """``python -m controller.mcp ARGS`` in this process (what ``corral mcp`` hands over to)."""
    env = {"HOME": str(home), "CORRAL_BROKER_URL": broker, "CORRAL_CONFIG": None}
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize(
    ("host", "relative"),
    [
        ("claude-code", ".claude.json"),
        ("cursor", ".cursor/mcp.json"),
        ("claude-desktop", ".config/Claude/claude_desktop_config.json"),
    ],
)
def test_install_writes_once_keeps_other_settings_and_uninstall_reverses_it(
    tmp_path: Path, host: str, relative: str
) -> None:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"theme": "dark", "mcpServers": {"other": {"command": "x"}}}))

    printed = mcp_command(tmp_path, "install", "--host", host)
    assert printed.exit_code == 0, printed.output
    assert str(path) in printed.output
    assert json.loads(path.read_text())["mcpServers"] == {"other": {"command": "x"}}  # untouched

    written = mcp_command(tmp_path, "install", "--host", host, "--write")
    assert written.exit_code == 0, written.output
    document = json.loads(path.read_text())
    entry = document["mcpServers"]["corral"]
    assert document["theme"] == "dark" and document["mcpServers"]["other"] == {"command": "x"}
    assert entry["command"] == sys.executable and entry["args"] == ["-m", "controller.mcp"]
    assert entry["env"] == {"CORRAL_BROKER_URL": PASSWORDLESS}
    assert json.loads(printed.output.split("\n", 1)[1]) == {"mcpServers": {"corral": entry}}
    assert (entry.get("type") == "stdio") == (host == "claude-code")

    before = path.read_text()
    again = mcp_command(tmp_path, "install", "--host", host, "--write")
    assert "already" in again.output and path.read_text() == before

    removed = mcp_command(tmp_path, "uninstall", "--host", host)
    assert removed.exit_code == 0 and "removed" in removed.output
    assert json.loads(path.read_text()) == {
        "theme": "dark",
        "mcpServers": {"other": {"command": "x"}},
    }
    assert "not in" in mcp_command(tmp_path, "uninstall", "--host", host).output


def test_the_entry_started_by_a_host_serves_mcp(tmp_path: Path) -> None:
    """What the written entry runs, run the way the host runs it, answers an initialize."""
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert (
        corral_mcp(tmp_path, "install", "--host", "cursor", "--write", broker=nobody).returncode
        == 0
    )
    entry = json.loads((tmp_path / ".cursor" / "mcp.json").read_text())["mcpServers"]["corral"]
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "host", "version": "1"},
        },
    }
    served = subprocess.run(
        [entry["command"], *entry["args"]],
        input=json.dumps(initialize) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO_ROOT),
            **entry["env"],
        },
        cwd=tmp_path,
    )
    reply = json.loads(served.stdout.splitlines()[0])
    assert reply["result"]["serverInfo"]["name"] == "corral"
    assert "cannot read the cluster yet" in served.stderr


def test_a_password_never_goes_into_a_host_config(tmp_path: Path) -> None:
    secret = "s3cret-pw-123"
    result = mcp_command(
        tmp_path, "install", "--host", "cursor", "--write", broker=f"redis://:{secret}@h:6379/0"
    )
    assert result.exit_code == 0, result.output
    written = (tmp_path / ".cursor" / "mcp.json").read_text()
    assert secret not in written and secret not in result.output
    assert "env" not in json.loads(written)["mcpServers"]["corral"]


def test_a_config_that_is_not_json_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / ".claude.json"
    path.write_text("{not json")
    result = mcp_command(tmp_path, "install", "--host", "claude-code", "--write")
    assert result.exit_code == 1
    assert "not valid JSON" in result.output
    assert path.read_text() == "{not json"


@pytest.mark.parametrize(
    ("bind", "allowed", "accepted", "refused"),
    [
        (
            "127.0.0.1",
            (),
            ["127.0.0.1:8765", "localhost:8765", "[::1]:8765"],
            ["evil.example:8765"],
        ),
        (
            "0.0.0.0",
            ("lab.home", "10.0.0.5:8765", "fe80::1"),
            ["lab.home", "lab.home:8765", "10.0.0.5:8765", "[fe80::1]:8765", "localhost:1"],
            ["0.0.0.0:8765", "10.0.0.5:9999", "lab.home.evil:8765", "evil.example"],
        ),
    ],
)
def test_http_accepts_only_the_host_names_it_was_given(
    bind: str, allowed: tuple[str, ...], accepted: list[str], refused: list[str]
) -> None:
    # The SDK's own check, fed the settings `corral mcp --http` builds.
    check = TransportSecurityMiddleware(transport_security(bind, allowed))
    assert [h for h in accepted if not check._validate_host(h)] == []
    assert [h for h in refused if check._validate_host(h)] == []


def test_corral_broker_flag_reaches_the_mcp_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            "--broker",
            "redis://10.1.2.3:6379/4",
            "mcp",
            "install",
            "--host",
            "cursor",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)},
        cwd=tmp_path,
    )
    assert printed.returncode == 0, printed.stderr
    entry = json.loads(printed.stdout.split("\n", 1)[1])["mcpServers"]["corral"]
    assert entry["env"] == {"CORRAL_BROKER_URL": "redis://10.1.2.3:6379/4"}
