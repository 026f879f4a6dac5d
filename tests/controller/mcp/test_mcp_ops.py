"""MCP operations: bearer-token auth over HTTP, generation options as ``ask`` arguments, and
``notifications/tools/list_changed`` when corral.yaml gains an alias (both protocol eras).

The official ``mcp`` client against ``python -m controller.mcp`` in its own process, over real
workers on redis-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.subscriptions import ToolsListChanged
from mcp.types import TextResourceContents, ToolListChangedNotification

from broker.settings import build_settings
from controller.client import CorralClient
from controller.localcluster import free_port, stop_process
from tests.support.servers import (
    REPO_ROOT,
    WorkerProcess,
    running_workers,
    start_worker,
    wait_until,
)

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
KEY = "mcp-test-key-7f3a"


def save(path: Path, text: str) -> None:
    """Write as an editor saves: a new file renamed over the old one."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)


@pytest.fixture(scope="module")
def cluster(module_broker_url: str, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(module_broker_url, module_log_dir, ("gamma", FAST)) as workers:
        with CorralClient(build_settings(broker_url=module_broker_url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "gamma up")
        yield workers


@dataclass
class Server:
    url: str
    config: Path
    log: Path
    env: dict[str, str]


def server_env(broker_url: str, config: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        CORRAL_BROKER_URL=broker_url,
        CORRAL_CONFIG=str(config),
        PYTHONPATH=str(REPO_ROOT),
        **extra,
    )
    return env


@pytest.fixture
def keyed_http_server(
    module_broker_url: str, tmp_path: Path, cluster: list[WorkerProcess]
) -> Iterator[Server]:
    config = tmp_path / "corral.yaml"
    save(config, "aliases:\n  first: [sim-small]\n")
    env = server_env(module_broker_url, config, CORRAL_API_KEYS=f"other-key,{KEY}")
    port = free_port()
    log_path = tmp_path / "mcp-http.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "controller.mcp", "--http", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}/mcp"

    def answers() -> bool:
        try:
            httpx.get(url, timeout=1)
        except httpx.TransportError:
            assert process.poll() is None, log_path.read_text()
            return False
        return True

    try:
        wait_until(answers, 30, "the MCP HTTP server")
        yield Server(url, config, log_path, env)
    finally:
        stop_process(process)


@asynccontextmanager
async def keyed_client(url: str, key: str) -> AsyncIterator[Client]:
    """The official client over streamable HTTP, sending ``Authorization: Bearer KEY``."""
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(60, read=120)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def test_http_needs_a_key_when_keys_are_set(keyed_http_server: Server) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    for given in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        refused = httpx.post(
            keyed_http_server.url, json=initialize, headers={**headers, **given}, timeout=10
        )
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "CORRAL_API_KEYS" in refused.json()["error"]

    async def with_key() -> Any:
        async with keyed_client(keyed_http_server.url, KEY) as client:
            tools = await client.list_tools()
            answer = await client.call_tool(
                "ask",
                {"prompt": "hi", "model": "first", "temperature": 0.2, "retry_partial": True},
            )
            return tools, answer

    tools, answer = asyncio.run(with_key())
    properties = next(t for t in tools.tools if t.name == "ask").input_schema["properties"]
    assert {"temperature", "retry_partial", "max_tokens"} <= set(properties)
    assert not answer.is_error
    assert answer.structured_content["routing"]["node"] == "gamma"
    assert KEY not in keyed_http_server.log.read_text()


def test_ask_refuses_a_temperature_out_of_range(keyed_http_server: Server) -> None:
    async def scenario() -> Any:
        async with keyed_client(keyed_http_server.url, KEY) as client:
            return await client.call_tool("ask", {"prompt": "hi", "temperature": 7})

    result = asyncio.run(scenario())
    assert result.is_error
    assert "temperature" in str(result.content)


def test_a_non_loopback_bind_without_keys_is_refused(module_broker_url: str) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "controller.mcp", "--http", str(free_port()), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "CORRAL_BROKER_URL": module_broker_url},
    )
    assert refused.returncode == 2
    assert "CORRAL_API_KEYS" in refused.stderr


def test_a_listening_client_hears_tools_list_changed_when_an_alias_is_added(
    keyed_http_server: Server,
) -> None:
    async def scenario() -> tuple[str, dict[str, Any]]:
        async with keyed_client(keyed_http_server.url, KEY) as client:
            async with client.listen(tools_list_changed=True) as changes:
                save(keyed_http_server.config, "aliases:\n  first: [sim-small]\n  fresh: [x]\n")
                event = await asyncio.wait_for(anext(changes), 30)
                assert isinstance(event, ToolsListChanged)
            described = await ask_description(client)
            # A broken edit: refused, the reason in the status resource, the aliases kept.
            save(keyed_http_server.config, "aliases: [broken\n")

            async def status() -> dict[str, Any]:
                contents = (await client.read_resource("corral://status.json")).contents
                assert isinstance(contents[0], TextResourceContents)
                return json.loads(contents[0].text)

            for _ in range(100):
                if (await status())["config_problem"]:
                    break
                await asyncio.sleep(0.1)
            return described, await status()

    described, status = asyncio.run(scenario())
    assert "fresh -> x" in described
    assert "not valid YAML" in status["config_problem"]
    assert status["aliases"] == {"first": ["sim-small"], "fresh": ["x"]}


class HandshakeEraSession:
    """The official client over stdio, forced to the 2025 handshake (as hosts speak today),
    noting each tools/list_changed it receives."""

    def __init__(self, broker_url: str, config: Path) -> None:
        self.params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "controller.mcp"],
            env=server_env(broker_url, config),
            cwd=REPO_ROOT,
        )
        self.changed = asyncio.Event()

    async def on_message(self, message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            self.changed.set()

    def client(self) -> Client:
        return Client(
            self.params, mode="legacy", message_handler=self.on_message, read_timeout_seconds=60
        )


async def ask_description(client: Client) -> str:
    tools = await client.list_tools()
    return next(t for t in tools.tools if t.name == "ask").description or ""


def test_a_handshake_era_client_is_notified_over_stdio(
    module_broker_url: str, tmp_path: Path, cluster: list[WorkerProcess]
) -> None:
    config = tmp_path / "corral.yaml"
    save(config, "aliases:\n  first: [sim-small]\n")
    session = HandshakeEraSession(module_broker_url, config)

    async def scenario() -> tuple[bool | None, str]:
        async with session.client() as client:
            declared = client.server_capabilities.tools
            await client.list_tools()
            save(config, "aliases:\n  first: [sim-small]\n  later: [sim-small]\n")
            await asyncio.wait_for(session.changed.wait(), 30)
            return (declared.list_changed if declared else None), await ask_description(client)

    declared, ask = asyncio.run(scenario())
    assert declared is True
    assert "later -> sim-small" in ask


def test_a_node_joining_sends_tools_list_changed(
    module_broker_url: str, tmp_path: Path, cluster: list[WorkerProcess]
) -> None:
    config = tmp_path / "corral.yaml"
    save(config, "aliases: {}\n")
    session = HandshakeEraSession(module_broker_url, config)

    async def scenario() -> str:
        async with session.client() as client:
            await client.list_tools()
            node = start_worker(
                module_broker_url, "latecomer", *FAST, "--tags", "late", log_dir=tmp_path
            )
            try:
                await asyncio.wait_for(session.changed.wait(), 30)
                return await ask_description(client)
            finally:
                node.stop()

    assert "latecomer (good for: late)" in asyncio.run(scenario())
