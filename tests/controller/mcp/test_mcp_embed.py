"""The MCP ``embed`` tool through the official mcp client over stdio, onto real workers on a
real Redis: a node with an embedding model and a chat-only one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp.client import Client
from mcp.types import CallToolResult

from broker.settings import build_settings
from controller.client import CorralClient
from tests.controller.mcp.test_mcp_server import over_stdio, text_of
from tests.support.servers import REPO_ROOT, running_workers, wait_until
from worker.backends.simulated import simulated_embedding

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


@pytest.fixture(scope="module")
def server_env(module_broker_url: str, module_log_dir: Path) -> Iterator[dict[str, str]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("embedder", [*FAST, "--sim-models", "sim-small,sim-embed"]),
        ("chatter", FAST),
    ):
        with CorralClient(build_settings(broker_url=module_broker_url)) as client:
            wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "both nodes up")
        yield {"CORRAL_BROKER_URL": module_broker_url, "PYTHONPATH": str(REPO_ROOT)}


def test_embed_returns_one_vector_per_text_as_structured_content(
    server_env: dict[str, str],
) -> None:
    async def calls(client: Client) -> tuple[CallToolResult, CallToolResult, CallToolResult]:
        return (
            await client.call_tool("embed", {"inputs": ["alpha", "beta"], "model": "sim-embed"}),
            await client.call_tool("embed", {"inputs": ["any model will do"]}),
            await client.call_tool("embed", {"inputs": ["x"], "node": "embedder"}),
        )

    named, unnamed, pinned = over_stdio(server_env, calls)
    assert not named.is_error
    content = named.structured_content
    assert content["embeddings"] == [simulated_embedding("alpha"), simulated_embedding("beta")]
    assert (content["model"], content["node"], content["prompt_tokens"]) == (
        "sim-embed",
        "embedder",
        2,
    )
    assert json.loads(text_of(named)) == content
    assert unnamed.structured_content["node"] == "embedder"  # never the chat-only node
    assert pinned.structured_content["embeddings"] == [simulated_embedding("x")]


def test_embed_errors_are_tool_errors(server_env: dict[str, str]) -> None:
    async def calls(client: Client) -> list[CallToolResult]:
        return [
            await client.call_tool("embed", {"inputs": ["x"], "model": "no-such-model"}),
            await client.call_tool("embed", {"inputs": ["x"], "model": "sim-small"}),
            await client.call_tool("embed", {"inputs": ["x"], "node": "chatter"}),
        ]

    missing, chat_model, chat_node = over_stdio(server_env, calls)
    assert missing.is_error and "no-such-model" in text_of(missing)
    assert chat_model.is_error and "not an embedding model" in text_of(chat_model)
    assert chat_node.is_error and "no up node has an embedding model" in text_of(chat_node)
