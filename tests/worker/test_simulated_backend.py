"""The simulated backend's pretend models: what it lists, and pull / load / unload / delete."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.errors import ModelNotFound, ModelOpError
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo, ToolDefinition, ToolFunction
from worker.backends.base import Chunk, PullProgress
from worker.backends.simulated import SimulatedBackend

HELLO = (ChatMessage(role="user", content="hello"),)


def fresh() -> SimulatedBackend:
    return SimulatedBackend(first_token_s=0, token_s=0, pull_s=0.05)


def by_name(models: list[ModelInfo]) -> dict[str, ModelInfo]:
    return {m.name: m for m in models}


def test_default_models_have_sizes_and_capabilities_and_the_first_is_loaded() -> None:
    inventory = by_name(asyncio.run(fresh().inventory()))
    assert list(inventory) == ["sim-small", "sim-large"]
    small, large = inventory["sim-small"], inventory["sim-large"]
    assert (small.loaded, small.loaded_until) == (True, None)
    assert small.loaded_bytes is not None and small.size_bytes is not None
    assert small.loaded_bytes > small.size_bytes
    assert small.capabilities == frozenset({"chat", "tools"})
    assert (large.loaded, large.loaded_bytes) == (False, None)
    assert large.capabilities == frozenset({"chat", "tools", "thinking"})
    assert large.size_bytes is not None and large.size_bytes > small.size_bytes


def test_pull_reports_progress_over_time_then_installs_the_model() -> None:
    async def scenario() -> tuple[list[PullProgress], float, list[ModelInfo]]:
        backend = fresh()
        started = time.monotonic()
        steps = [step async for step in backend.pull("sim-embed")]
        return steps, time.monotonic() - started, await backend.inventory()

    steps, took, inventory = asyncio.run(scenario())
    assert steps[0].status == "pulling manifest"
    assert steps[-1].status == "success"
    weights = [s for s in steps if s.total is not None and s.total > 1_000_000]
    assert len(weights) > 3
    assert [s.completed for s in weights] == sorted(s.completed or 0 for s in weights)
    assert weights[-1].completed == weights[-1].total
    assert took >= 0.04  # spread over the pull's pace, not all at once
    embed = by_name(inventory)["sim-embed"]
    assert (embed.loaded, embed.capabilities) == (False, frozenset({"embed"}))


def test_pull_of_a_model_the_simulated_registry_lacks_is_model_not_found() -> None:
    statuses: list[str] = []

    async def scenario() -> None:
        async for step in fresh().pull("llama9"):
            statuses.append(step.status)

    with pytest.raises(ModelNotFound, match="llama9"):
        asyncio.run(scenario())
    assert statuses == ["pulling manifest"]


def test_load_unload_and_keep_alive() -> None:
    async def scenario() -> list[ModelInfo]:
        backend = fresh()
        seen = []
        await backend.load("sim-large", "30m")
        seen.append(by_name(await backend.inventory())["sim-large"])
        await backend.load("sim-large")  # no keep_alive: loaded until unloaded
        seen.append(by_name(await backend.inventory())["sim-large"])
        await backend.unload("sim-large")
        seen.append(by_name(await backend.inventory())["sim-large"])
        await backend.load("sim-large", "50ms")
        await asyncio.sleep(0.1)
        seen.append(by_name(await backend.inventory())["sim-large"])
        return seen

    for_30m, forever, unloaded, expired = asyncio.run(scenario())
    assert for_30m.loaded
    assert for_30m.loaded_until == pytest.approx(time.time() + 1800, abs=30)
    assert (forever.loaded, forever.loaded_until) == (True, None)
    assert not unloaded.loaded
    assert not expired.loaded


def test_load_refuses_an_unreadable_keep_alive_and_a_missing_model() -> None:
    backend = fresh()
    with pytest.raises(ModelOpError, match="not a duration"):
        asyncio.run(backend.load("sim-large", "a while"))
    with pytest.raises(ModelNotFound, match="sim-huge"):
        asyncio.run(backend.load("sim-huge"))


def test_delete_removes_the_model_so_chat_and_a_second_delete_fail() -> None:
    async def scenario() -> list[str]:
        backend = fresh()
        await backend.delete("sim-small")
        with pytest.raises(ModelNotFound):
            await backend.delete("sim-small")
        with pytest.raises(ModelNotFound):
            async for _ in backend.stream_chat("sim-small", HELLO, GenerationOptions()):
                pass
        return [m.name for m in await backend.inventory()]

    assert asyncio.run(scenario()) == ["sim-large"]


def test_a_simulated_model_with_tools_calls_the_first_one_then_answers_its_result() -> None:
    tool = ToolDefinition(function=ToolFunction(name="lookup"))
    asked = (ChatMessage(role="user", content="find it"),)

    async def run(messages: tuple[ChatMessage, ...]) -> list[Chunk]:
        stream = fresh().stream_chat("sim-small", messages, GenerationOptions(), tools=(tool,))
        return [chunk async for chunk in stream]

    called = asyncio.run(run(asked))
    assert [c.name for c in called[0].tool_calls] == ["lookup"]
    assert called[-1].done and called[-1].finish_reason == "tool_calls"
    call = called[0].tool_calls[0]
    answered = asyncio.run(
        run(
            (
                *asked,
                ChatMessage(role="assistant", content="", tool_calls=(call,)),
                ChatMessage(role="tool", content="here", tool_call_id=call.id, name="lookup"),
            )
        )
    )
    assert "".join(c.text for c in answered) and answered[-1].finish_reason == "stop"
