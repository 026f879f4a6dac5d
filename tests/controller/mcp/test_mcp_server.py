"""The MCP server as an agent meets it: the official mcp client over stdio and streamable HTTP,
against redis-server and real simulated workers.

``python -m controller.mcp`` runs in its own process in every test, as an MCP host starts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent, TextResourceContents

from broker import names
from broker.schemas import ChatMessage
from broker.settings import build_settings
from controller.client import CorralClient
from controller.localcluster import free_port, stop_process
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.support.servers import (
    REPO_ROOT,
    WorkerProcess,
    running_workers,
    start_worker,
    wait_until,
)
from worker.backends.simulated import reply_for

T = TypeVar("T")
FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
SLOW = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "60"]
ALIASES = {"quick": ["sim-small"]}


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture(scope="module")
def cluster(module_broker_url: str, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("alpha", [*FAST, "--tags", "code"]),
        ("slowpoke", [*SLOW, "--tags", "chat"]),
    ) as workers:
        with CorralClient(build_settings(broker_url=module_broker_url)) as client:
            wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 15, "both nodes up")
        yield workers


@pytest.fixture(scope="module")
def server_env(module_broker_url: str, cluster: list[WorkerProcess]) -> dict[str, str]:
    return {
        "CORRAL_BROKER_URL": module_broker_url,
        "CORRAL_ALIASES": json.dumps(ALIASES),
        "PYTHONPATH": str(REPO_ROOT),
    }


def over_stdio(env: dict[str, str], scenario: Callable[[Client], Awaitable[T]]) -> T:
    """Spawn ``python -m controller.mcp`` as a host would and run ``scenario`` against it."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "controller.mcp"], env=env, cwd=REPO_ROOT
    )

    async def run() -> T:
        async with Client(params, read_timeout_seconds=60) as client:
            return await scenario(client)

    return asyncio.run(run())


def text_of(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


def test_tools_are_listed_with_what_each_model_and_node_is_good_for(
    server_env: dict[str, str],
) -> None:
    tools = over_stdio(server_env, lambda c: c.list_tools())
    by_name = {tool.name: tool for tool in tools.tools}
    assert set(by_name) == {
        "ask",
        "fanout",
        "list_models",
        "list_nodes",
        "job_status",
        "job_result",
        "job_cancel",
        "embed",
    }
    ask = by_name["ask"].description or ""
    assert "sim-small" in ask and "sim-large" in ask
    assert "alpha (good for: code)" in ask and "slowpoke (good for: chat)" in ask
    assert "quick -> sim-small" in ask
    properties = set(by_name["ask"].input_schema["properties"])
    assert {"prompt", "model", "node", "tags", "wait"} <= properties
    assert by_name["ask"].input_schema["required"] == ["prompt"]


def test_ask_answers_with_routing_as_structured_content(server_env: dict[str, str]) -> None:
    prompt = "what does a home lab do"
    result = over_stdio(
        server_env, lambda c: c.call_tool("ask", {"prompt": prompt, "tags": ["code"]})
    )
    assert not result.is_error
    assert text_of(result) == expected(prompt)
    routing = result.structured_content["routing"]
    assert routing["node"] == "alpha"
    assert routing["model"] in ("sim-small", "sim-large")
    assert routing["tier"] == "local"
    assert routing["reason"]
    assert result.structured_content["status"] == "done"


def test_ask_through_an_alias_and_a_pinned_node(server_env: dict[str, str]) -> None:
    async def both(client: Client) -> tuple[CallToolResult, CallToolResult]:
        by_alias = await client.call_tool("ask", {"prompt": "alias", "model": "quick"})
        pinned = await client.call_tool("ask", {"prompt": "pin", "node": "alpha", "max_tokens": 3})
        return by_alias, pinned

    by_alias, pinned = over_stdio(server_env, both)
    assert by_alias.structured_content["routing"]["model"] == "sim-small"
    assert pinned.structured_content["routing"]["node"] == "alpha"
    assert pinned.structured_content["routing"]["reason"] == "pinned to node alpha"
    assert pinned.structured_content["tokens"] == 3


def test_a_session_continues_on_the_node_that_holds_it(server_env: dict[str, str]) -> None:
    async def conversation(client: Client) -> list[CallToolResult]:
        first = await client.call_tool(
            "ask", {"prompt": "remember me", "session": "mcp-talk", "max_tokens": 2}
        )
        rest = [
            await client.call_tool(
                "ask", {"prompt": f"and again {i}", "session": "mcp-talk", "max_tokens": 2}
            )
            for i in range(3)
        ]
        return [first, *rest]

    answers = over_stdio(server_env, conversation)
    first_node = answers[0].structured_content["routing"]["node"]
    for later in answers[1:]:
        routing = later.structured_content["routing"]
        assert routing["node"] == first_node
        assert routing["reason"] == "the node holding this session"


def test_a_slow_answer_sends_progress_as_tokens_arrive(server_env: dict[str, str]) -> None:
    prompt = "tell me slowly"
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async def ask(client: Client) -> CallToolResult:
        return await client.call_tool(
            "ask", {"prompt": prompt, "node": "slowpoke"}, progress_callback=on_progress
        )

    result = over_stdio(server_env, ask)
    answer = expected(prompt)
    assert text_of(result) == answer
    assert len(seen) == result.structured_content["tokens"] > 5
    assert [p for p, _ in seen] == list(range(1, len(seen) + 1))
    assert "".join(m or "" for _, m in seen) == answer


def test_fanout_gives_one_answer_per_model_and_per_node(server_env: dict[str, str]) -> None:
    prompt = "compare"

    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async def both(client: Client) -> tuple[CallToolResult, CallToolResult]:
        by_model = await client.call_tool(
            "fanout",
            {"prompt": prompt, "models": ["sim-small", "sim-large"]},
            progress_callback=on_progress,
        )
        by_node = await client.call_tool(
            "fanout", {"prompt": prompt, "nodes": ["alpha", "slowpoke"], "max_tokens": 4}
        )
        return by_model, by_node

    by_model, by_node = over_stdio(server_env, both)
    models = by_model.structured_content["results"]
    assert [r["model"] for r in models] == ["sim-small", "sim-large"]
    assert [r["routing"]["model"] for r in models] == ["sim-small", "sim-large"]
    assert all(r["answer"] == expected(prompt) and r["error"] is None for r in models)
    assert "## sim-small on" in text_of(by_model)
    for label in ("sim-small", "sim-large"):  # each job's tokens, labelled, in order
        mine = [m.removeprefix(f"[{label}] ") for m in messages if m.startswith(f"[{label}] ")]
        assert "".join(mine) == expected(prompt)
    nodes = by_node.structured_content["results"]
    assert [r["routing"]["node"] for r in nodes] == ["alpha", "slowpoke"]
    assert all(r["answer"] for r in nodes)


def test_fanout_to_the_best_count_nodes(server_env: dict[str, str]) -> None:
    async def fan(client: Client) -> tuple[CallToolResult, CallToolResult]:
        best = await client.call_tool(
            "fanout", {"prompt": "two views", "count": 5, "model": "sim-large", "max_tokens": 3}
        )
        unknown = await client.call_tool(
            "fanout", {"prompt": "x", "count": 2, "model": "no-such-model"}
        )
        return best, unknown

    best, unknown = over_stdio(server_env, fan)
    results = best.structured_content["results"]
    assert sorted(r["routing"]["node"] for r in results) == ["alpha", "slowpoke"]  # 2 exist
    assert {r["routing"]["model"] for r in results} == {"sim-large"}
    assert unknown.is_error and "no-such-model" in text_of(unknown)


def test_list_models_and_list_nodes(server_env: dict[str, str]) -> None:
    async def both(client: Client) -> tuple[CallToolResult, CallToolResult]:
        return await client.call_tool("list_models", {}), await client.call_tool("list_nodes", {})

    models, nodes = over_stdio(server_env, both)
    rows = models.structured_content["models"]
    small = next(r for r in rows if r.get("model") == "sim-small")
    assert small["nodes"] == ["alpha", "slowpoke"]
    assert {"alias": "quick", "tries": ["sim-small"]} in rows
    by_node = {r["node"]: r for r in nodes.structured_content["nodes"]}
    assert by_node["alpha"]["up"] and by_node["alpha"]["tags"] == ["code"]
    assert by_node["slowpoke"]["backends"] == ["simulated"]
    assert json.loads(text_of(nodes)) == nodes.structured_content["nodes"]


def test_wait_false_returns_a_job_id_to_poll(server_env: dict[str, str]) -> None:
    prompt = "a long essay"

    async def poll(client: Client) -> tuple[CallToolResult, CallToolResult, CallToolResult]:
        started = await client.call_tool(
            "ask", {"prompt": prompt, "node": "slowpoke", "wait": False}
        )
        job_id = started.structured_content["job_id"]
        status = await client.call_tool("job_status", {"job_id": job_id})
        result = await client.call_tool("job_result", {"job_id": job_id, "timeout_s": 30})
        other = await client.call_tool(
            "ask", {"prompt": "stop me", "node": "slowpoke", "wait": False}
        )
        other_id = other.structured_content["job_id"]
        assert not (await client.call_tool("job_cancel", {"job_id": other_id})).is_error
        stopped = await client.call_tool("job_result", {"job_id": other_id, "timeout_s": 30})
        assert stopped.is_error and "cancelled" in text_of(stopped)
        return started, status, result

    started, status, result = over_stdio(server_env, poll)
    assert started.structured_content["status"] == "queued"
    assert started.structured_content["job_id"] in text_of(started)
    assert status.structured_content["status"] in ("queued", "running")
    assert text_of(result) == expected(prompt)
    assert result.structured_content["status"] == "done"
    assert result.structured_content["routing"]["node"] == "slowpoke"


def test_a_job_from_an_earlier_server_is_read_back_from_its_stream(
    server_env: dict[str, str],
) -> None:
    prompt = "durable"
    started = over_stdio(
        server_env,
        lambda c: c.call_tool("ask", {"prompt": prompt, "node": "alpha", "wait": False}),
    )
    job_id = started.structured_content["job_id"]
    # A new server process never saw this job: it replays the job's log from Redis.
    result = over_stdio(
        server_env, lambda c: c.call_tool("job_result", {"job_id": job_id, "timeout_s": 20})
    )
    assert text_of(result) == expected(prompt)
    assert result.structured_content["routing"]["node"] == "alpha"


def test_status_resources(server_env: dict[str, str]) -> None:
    async def read(client: Client) -> tuple[Any, Any, Any]:
        listed = await client.list_resources()
        return (
            listed,
            await client.read_resource("corral://status"),
            await client.read_resource("corral://status.json"),
        )

    listed, text, as_json = over_stdio(server_env, read)
    assert {str(r.uri) for r in listed.resources} == {"corral://status", "corral://status.json"}
    status = text.contents[0]
    assert isinstance(status, TextResourceContents)
    assert "alpha: up" in status.text and "slowpoke: up" in status.text
    document = json.loads(as_json.contents[0].text)
    assert {n["node"] for n in document["nodes"]} == {"alpha", "slowpoke"}
    assert document["aliases"] == ALIASES


def test_bad_requests_are_tool_errors_and_the_server_keeps_serving(
    server_env: dict[str, str],
) -> None:
    async def errors(client: Client) -> list[CallToolResult]:
        return [
            await client.call_tool("ask", {"prompt": "hi", "model": "no-such-model"}),
            await client.call_tool("ask", {"prompt": "hi", "node": "nowhere"}),
            await client.call_tool("fanout", {"prompt": "hi"}),
            await client.call_tool("job_status", {"job_id": "0123456789abcdef"}),
            await client.call_tool("ask", {"prompt": "still here", "max_tokens": 2}),
        ]

    model, node, fanout, job, after = over_stdio(server_env, errors)
    assert model.is_error and "no-such-model" in text_of(model)
    assert node.is_error and "nowhere" in text_of(node)
    assert fanout.is_error and "give one of models, nodes" in text_of(fanout)
    assert job.is_error and "no job 0123456789abcdef" in text_of(job)
    assert not after.is_error and after.structured_content["tokens"] == 2


def test_nothing_up_is_a_tool_error(broker_url: str) -> None:
    env = {"CORRAL_BROKER_URL": broker_url, "PYTHONPATH": str(REPO_ROOT)}  # no workers here
    result = over_stdio(env, lambda c: c.call_tool("ask", {"prompt": "anyone?"}))
    assert result.is_error
    assert "no node" in text_of(result).lower()


# --- streamable HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(server_env: dict[str, str], module_log_dir: Path) -> Iterator[str]:
    port = free_port()
    log_path = module_log_dir / "mcp-http.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody drains
        process = subprocess.Popen(
            [sys.executable, "-m", "controller.mcp", "--http", str(port)],
            env={**os.environ, **server_env},
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
        yield url
    finally:
        stop_process(process)


def test_http_tools_and_progress(http_server: str) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def run() -> tuple[Any, CallToolResult]:
        async with Client(http_server, read_timeout_seconds=60) as client:
            tools = await client.list_tools()
            result = await client.call_tool(
                "ask", {"prompt": "over http", "node": "slowpoke"}, progress_callback=on_progress
            )
            return tools, result

    tools, result = asyncio.run(run())
    assert "ask" in {t.name for t in tools.tools}
    assert text_of(result) == expected("over http")
    assert len(seen) == result.structured_content["tokens"]


def test_http_refuses_a_foreign_host_header(http_server: str) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the tools."""
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
    refused = httpx.post(
        http_server, json=initialize, headers={**headers, "Host": "evil.example:80"}, timeout=10
    )
    assert refused.status_code == 421
    accepted = httpx.post(http_server, json=initialize, headers=headers, timeout=10)
    assert accepted.status_code == 200


def test_a_backend_failing_mid_stream_is_a_tool_error_that_says_so(
    broker_url: str, tmp_path: Path
) -> None:
    """A real worker in front of a provider (the fake Anthropic API) whose stream breaks."""
    key = "sk-ant-mcp-test-0000"
    with running_fake_anthropic(api_key=key, models=["claude-mcp"], error_after=2) as fake:
        config = tmp_path / "corral.yaml"
        config.write_text(
            f"worker:\n  backends:\n    - kind: anthropic\n      name: claude\n"
            f"      url: {fake.url}\n"
        )
        worker = start_worker(
            broker_url,
            "cloudy",
            log_dir=tmp_path,
            env={"ANTHROPIC_API_KEY": key, "CORRAL_CONFIG": str(config)},
        )
        try:
            env = {"CORRAL_BROKER_URL": broker_url, "PYTHONPATH": str(REPO_ROOT)}
            result = over_stdio(
                env, lambda c: c.call_tool("ask", {"prompt": "hi", "model": "claude-mcp"})
            )
        finally:
            worker.stop()
    assert result.is_error
    message = text_of(result)
    assert "failed: backend_protocol" in message and "failed mid-stream" in message
    assert key not in message


def test_a_caller_that_gives_up_cancels_the_job(
    server_env: dict[str, str], module_broker_url: str
) -> None:
    def cancelled_jobs() -> set[str]:
        found = set()
        r = redis.Redis.from_url(module_broker_url)
        for key in r.scan_iter(match=names.job_log_key("*")):
            last = r.lrange(key, -1, -1)
            if last and '"cancelled"' in last[0].decode():
                found.add(key.decode())
        r.close()
        return found

    before = cancelled_jobs()

    async def impatient(client: Client) -> None:
        with pytest.raises(MCPError):
            await client.call_tool(
                "ask", {"prompt": "take your time", "node": "slowpoke"}, read_timeout_seconds=0.4
            )

    over_stdio(server_env, impatient)
    # The whole answer takes about 1.5 s on slowpoke; it is cancelled well before.
    wait_until(lambda: len(cancelled_jobs() - before) == 1, 5, "the abandoned job cancelled")


def test_a_node_that_joins_later_is_in_the_next_tool_listing(
    broker_url: str, tmp_path: Path
) -> None:
    env = {"CORRAL_BROKER_URL": broker_url, "PYTHONPATH": str(REPO_ROOT)}
    started: list[WorkerProcess] = []

    async def scenario(client: Client) -> tuple[str, str]:
        before = await client.list_tools()
        started.append(
            await asyncio.to_thread(
                start_worker, broker_url, "latecomer", *FAST, "--tags", "vision", log_dir=tmp_path
            )
        )
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            after = await client.list_tools()
            ask = next(t for t in after.tools if t.name == "ask")
            if "latecomer" in (ask.description or ""):
                break
            assert asyncio.get_running_loop().time() < deadline, ask.description
            await asyncio.sleep(0.5)
        first = next(t for t in before.tools if t.name == "ask")
        return first.description or "", ask.description or ""

    try:
        before, after = over_stdio(env, scenario)
    finally:
        for worker in started:
            worker.stop()
    assert "No node is up" in before
    assert "latecomer (good for: vision)" in after and "sim-small" in after
