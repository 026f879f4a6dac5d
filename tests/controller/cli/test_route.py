"""`corral route` and `@route`, run as a user runs them: each CLI call its own process (so two
calls are two controller processes that must agree through Redis), real worker processes.

One cluster for the module: ``pi1`` fronts a fake Ollama, ``cloudy`` fronts the fake Anthropic
Messages API (an ``anthropic`` backend in its corral.yaml, its key in ANTHROPIC_API_KEY). Each
test uses route names the others leave alone.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextContent

from controller.cli import ExitCode
from tests.controller.gateway.conftest import running_gateway
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.fakes.fake_ollama import DEFAULT_REPLY, running_fake_ollama
from tests.support.cli import corral
from tests.support.servers import REPO_ROOT, start_worker

CLAUDE_KEY = "sk-ant-route-PLANTED-41d2"
CLAUDE_MODEL = "claude-route-haiku"
CLAUDE_REPLY = "A route is a name for an endpoint."


class Cluster(NamedTuple):
    broker_url: str
    ollama_url: str
    anthropic_url: str


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def cluster(module_broker_url: str, module_log_dir: Path) -> Iterator[Cluster]:
    with (
        running_fake_ollama(["llama3.2:1b"]) as ollama,
        running_fake_anthropic(
            api_key=CLAUDE_KEY, models=[CLAUDE_MODEL], reply=CLAUDE_REPLY
        ) as claude,
    ):
        config = module_log_dir / "cloudy.yaml"
        config.write_text(
            f"worker:\n  backends:\n    - kind: anthropic\n      name: claude\n"
            f"      url: {claude.url}\n"
        )
        pi1 = start_worker(module_broker_url, "pi1", "--ollama", ollama.url, log_dir=module_log_dir)
        cloudy = start_worker(
            module_broker_url,
            "cloudy",
            log_dir=module_log_dir,
            env={"ANTHROPIC_API_KEY": CLAUDE_KEY, "CORRAL_CONFIG": str(config)},
        )
        try:
            yield Cluster(module_broker_url, ollama.url, claude.url)
        finally:
            pi1.stop()
            cloudy.stop()


def test_routes_added_by_one_process_are_listed_checked_and_removed_by_others(
    cluster: Cluster,
) -> None:
    port = cluster.ollama_url.rsplit(":", 1)[1]
    added = corral(
        cluster.broker_url, "route", "add", "Home-Pi", f"ollama://127.0.0.1:{port}", "llama3.2:1b"
    )
    assert added.returncode == ExitCode.OK, added.stderr
    assert "@home-pi" in added.stdout  # normalized to lowercase
    assert (
        corral(cluster.broker_url, "route", "add", "dead", "llamacpp://127.0.0.1:9").returncode == 0
    )
    assert (
        corral(
            cluster.broker_url, "route", "add", "keyless", "mistral://", "mistral-small"
        ).returncode
        == 0
    )

    listing = corral(cluster.broker_url, "route", "list")
    assert listing.returncode == ExitCode.OK, listing.stderr
    rows = {line.split()[1]: line for line in listing.stdout.splitlines() if "@" in line}
    assert rows["@home-pi"].startswith("✓") and "served by pi1" in rows["@home-pi"]
    assert rows["@dead"].startswith("✗") and "ConnectError" in rows["@dead"]
    assert rows["@keyless"].startswith("?") and "MISTRAL_API_KEY" in rows["@keyless"]

    caps = corral(cluster.broker_url, "route", "caps", "home-pi")
    assert caps.returncode == ExitCode.OK, caps.stderr
    assert "kind      ollama (local)" in caps.stdout and "served by pi1/" in caps.stdout
    dead_caps = corral(cluster.broker_url, "route", "caps", "dead")
    assert "no model" in dead_caps.stdout and "served by nobody" in dead_caps.stdout

    taken = corral(cluster.broker_url, "route", "add", "home-pi", "ollama://elsewhere")
    assert taken.returncode == ExitCode.USAGE and "exists" in taken.stderr
    for name in ("dead", "keyless"):
        assert corral(cluster.broker_url, "route", "rm", name).returncode == ExitCode.OK
    gone = corral(cluster.broker_url, "route", "rm", "dead")
    assert gone.returncode == ExitCode.USAGE and "no route named 'dead'" in gone.stderr
    listing = corral(cluster.broker_url, "route", "list")
    assert "@dead" not in listing.stdout and "@home-pi" in listing.stdout


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        ("bad_name", "ollama://pi2", "letters, digits and hyphens"),
        ("edge-", "ollama://pi2", "letters, digits and hyphens"),
        ("pi1", "ollama://pi2", "is a node's name"),
        ("fine", "ftp://pi2", "unknown route scheme"),
    ],
)
def test_a_bad_route_is_refused_with_a_reason(
    cluster: Cluster, name: str, url: str, says: str
) -> None:
    result = corral(cluster.broker_url, "route", "add", name, url)
    assert result.returncode == ExitCode.USAGE
    assert says in flat(result.stderr) and "Traceback" not in result.stderr


def test_at_a_local_route_runs_on_the_node_that_fronts_its_backend(cluster: Cluster) -> None:
    port = cluster.ollama_url.rsplit(":", 1)[1]
    assert (
        corral(cluster.broker_url, "route", "add", "lab", f"http://127.0.0.1:{port}").returncode
        == 0
    )
    no_model = corral(cluster.broker_url, "ask", "@lab hello")
    assert no_model.returncode == ExitCode.USAGE and "@lab --model M" in flat(no_model.stderr)

    answer = corral(cluster.broker_url, "ask", "--model", "llama3.2:1b", "@lab why is the sky blue")
    assert answer.returncode == ExitCode.OK, answer.stderr
    assert answer.stdout.strip() == DEFAULT_REPLY
    assert "→ pi1" in answer.stderr


def test_at_claude_is_served_by_the_worker_holding_the_key_and_the_key_stays_there(
    cluster: Cluster,
) -> None:
    where = cluster.anthropic_url.removeprefix("http://")
    added = corral(
        cluster.broker_url, "route", "add", "claude", f"anthropic+http://{where}", CLAUDE_MODEL
    )
    assert added.returncode == ExitCode.OK, added.stderr
    answer = corral(cluster.broker_url, "ask", "@claude what is a route?")
    assert answer.returncode == ExitCode.OK, answer.stderr
    assert answer.stdout.strip() == CLAUDE_REPLY
    assert "→ cloudy" in answer.stderr and CLAUDE_MODEL in answer.stderr

    exported = corral(cluster.broker_url, "route", "list")
    assert CLAUDE_KEY not in exported.stdout + exported.stderr + answer.stderr


def test_a_cloud_route_no_worker_can_serve_is_exit_3_naming_the_key(cluster: Cluster) -> None:
    assert (
        corral(
            cluster.broker_url, "route", "add", "gem", "gemini://", "gemini-2.0-flash"
        ).returncode
        == 0
    )
    result = corral(cluster.broker_url, "ask", "@gem hello")
    assert result.returncode == ExitCode.NO_ROUTE
    assert "GEMINI_API_KEY or GOOGLE_API_KEY" in flat(result.stderr)


def test_with_routing_off_a_route_mention_is_refused_and_nodes_still_answer(
    cluster: Cluster,
) -> None:
    port = cluster.ollama_url.rsplit(":", 1)[1]
    corral(
        cluster.broker_url, "route", "add", "switch", f"ollama://127.0.0.1:{port}", "llama3.2:1b"
    )
    try:
        assert corral(cluster.broker_url, "route", "off").stdout.strip() == "routing off"
        status = corral(cluster.broker_url, "route", "status")
        assert status.stdout.startswith("routing off")
        refused = corral(cluster.broker_url, "ask", "@switch hello")
        assert refused.returncode == ExitCode.USAGE and "corral route on" in refused.stderr
        node = corral(cluster.broker_url, "ask", "--model", "llama3.2:1b", "@pi1 hello")
        assert node.returncode == ExitCode.OK, node.stderr
    finally:
        assert corral(cluster.broker_url, "route", "on").returncode == ExitCode.OK
    assert corral(cluster.broker_url, "ask", "@switch hello").returncode == ExitCode.OK


def test_an_unknown_name_suggests_the_close_routes_and_nodes(cluster: Cluster) -> None:
    corral(cluster.broker_url, "route", "add", "coder", "ollama://127.0.0.1:1", "qwen")
    result = corral(cluster.broker_url, "ask", "@codr hello")
    assert result.returncode == ExitCode.NO_ROUTE
    assert "did you mean @coder" in flat(result.stderr)
    assert "did you mean @pi1" in flat(corral(cluster.broker_url, "ask", "@pi2 hi").stderr)


def test_routes_export_and_import_through_a_file_with_secrets_only_as_references(
    cluster: Cluster, tmp_path: Path
) -> None:
    corral(cluster.broker_url, "route", "add", "exported", "openai://", "gpt-4o-mini")
    yaml_file, json_file = tmp_path / "routes.yaml", tmp_path / "routes.json"
    assert corral(cluster.broker_url, "route", "export", str(yaml_file)).returncode == 0
    assert corral(cluster.broker_url, "route", "export", str(json_file)).returncode == 0
    routes = {r["name"]: r for r in json.loads(json_file.read_text())["routes"]}
    assert routes["exported"] == {"name": "exported", "url": "openai://", "model": "gpt-4o-mini"}
    assert "name: exported" in yaml_file.read_text()

    assert corral(cluster.broker_url, "route", "rm", "exported").returncode == 0
    imported = corral(cluster.broker_url, "route", "import", str(yaml_file))
    assert imported.returncode == ExitCode.OK, imported.stderr
    assert "@exported" in corral(cluster.broker_url, "route", "list").stdout

    clear = tmp_path / "clear.yaml"
    clear.write_text("routes:\n  - name: leak\n    url: openai://\n    api_key: sk-in-clear-77\n")
    refused = corral(cluster.broker_url, "route", "import", str(clear))
    assert refused.returncode == ExitCode.USAGE and "${VAR}" in refused.stderr
    assert "sk-in-clear-77" not in refused.stderr


def test_the_gateway_and_the_mcp_ask_tool_resolve_a_route_too(
    cluster: Cluster, module_log_dir: Path
) -> None:
    where = cluster.anthropic_url.removeprefix("http://")
    route = ("route", "add", "front", f"anthropic+http://{where}", CLAUDE_MODEL)
    assert corral(cluster.broker_url, *route).returncode == ExitCode.OK
    with running_gateway(cluster.broker_url, module_log_dir) as gateway:
        answer = httpx.post(
            f"{gateway.v1}/chat/completions",
            json={"model": "@front", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == CLAUDE_REPLY
        assert answer.json()["model"] == CLAUDE_MODEL
        unknown = httpx.post(
            f"{gateway.v1}/chat/completions",
            json={"model": "@frnt", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert unknown.status_code == 404 and "did you mean @front" in unknown.text

    async def scenario(client: Client) -> CallToolResult:
        return await client.call_tool("ask", {"prompt": "hi", "node": "front"})

    env = {"CORRAL_BROKER_URL": cluster.broker_url, "PYTHONPATH": str(REPO_ROOT)}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "controller.mcp"], env=env, cwd=REPO_ROOT
    )

    async def run() -> CallToolResult:
        async with Client(params, read_timeout_seconds=60) as client:
            return await scenario(client)

    result = asyncio.run(run())
    assert not result.is_error
    text = "".join(block.text for block in result.content if isinstance(block, TextContent))
    assert CLAUDE_REPLY in text
