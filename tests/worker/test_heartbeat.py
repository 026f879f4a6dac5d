"""The node's heartbeat: what ``build_node_info`` reports and what ``publish_node_info`` stores."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis
from redis.asyncio import Redis

from broker import names
from broker.schemas import GpuInfo, NodeInfo
from controller.localcluster import free_port
from tests.fakes.fake_ollama import FakeModel, running_fake_ollama
from worker.backends.base import Backend
from worker.backends.ollama import OllamaBackend
from worker.backends.openai_compat import OpenAICompatBackend
from worker.backends.simulated import SimulatedBackend
from worker.config import WorkerConfig, backend_spec
from worker.heartbeat import build_node_info, publish_node_info
from worker.sysinfo import SystemProbe

CONFIG = WorkerConfig(
    name="gpu1",
    tags=frozenset({"gpu"}),
    backends=(
        backend_spec(kind="simulated", capacity=2),
        backend_spec(kind="ollama", url="http://127.0.0.1:11434", capacity=3),
        backend_spec(kind="openai", url="http://127.0.0.1:8080"),
    ),
)


def node_info(
    backends: dict[str, Backend],
    *,
    in_flight: dict[str, int],
    latency: dict[str, float],
    system: SystemProbe | None = None,
) -> NodeInfo:
    return asyncio.run(
        build_node_info(
            CONFIG,
            backends,
            instance="3f1c9a",
            in_flight=sum(in_flight.values()),
            interval_s=0.5,
            started_at=1_700_000_000.0,
            backend_in_flight=in_flight,
            backend_latency_ms=latency,
            system=system,
        )
    )


def with_node_backends(
    ollama_url: str, scenario: Callable[[dict[str, Backend]], Awaitable[NodeInfo]]
) -> NodeInfo:
    """The three kinds side by side: simulated, an Ollama at ``ollama_url``, an OpenAI-
    compatible server that is not running."""

    async def main() -> NodeInfo:
        async with httpx.AsyncClient() as client:
            backends: dict[str, Backend] = {
                "simulated": SimulatedBackend(capacity=2),
                "ollama": OllamaBackend("ollama", ollama_url, client, capacity=3),
                "openai": OpenAICompatBackend(
                    "openai", f"http://127.0.0.1:{free_port()}", client, capacity=1
                ),
            }
            return await scenario(backends)

    return asyncio.run(main())


def test_node_info_carries_instance_resources_and_each_backends_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564, 20000'\n")
    fake_smi.chmod(fake_smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    models = [FakeModel("llama3.1:8b", size=4_920_753_328), FakeModel.embedding("bge-m3")]

    async def scenario(backends: dict[str, Backend]) -> NodeInfo:
        return await build_node_info(
            CONFIG,
            backends,
            instance="3f1c9a",
            in_flight=2,
            interval_s=0.5,
            started_at=1_700_000_000.0,
            backend_in_flight={"ollama": 2},
            backend_latency_ms={"ollama": 182.5, "simulated": 51.0},
            system=SystemProbe(),
        )

    with running_fake_ollama(models, loaded=["llama3.1:8b"]) as fake:
        info = with_node_backends(fake.url, scenario)

    assert (info.name, info.instance, info.tags, info.capacity) == (
        "gpu1",
        "3f1c9a",
        frozenset({"gpu"}),
        6,
    )
    assert info.gpus == (
        GpuInfo(
            name="NVIDIA GeForce RTX 4090",
            total_bytes=24564 * 1024 * 1024,
            free_bytes=20000 * 1024 * 1024,
        ),
    )
    assert info.memory is not None and info.memory.available_bytes > 0
    assert info.cpu_load is not None and info.cpu_load >= 0
    free = info.free_memory_bytes()
    assert free is not None and free > 20000 * 1024 * 1024

    sim, ollama, openai = info.backends
    assert (sim.in_flight, sim.latency_ms, sim.manages_models, sim.capacity) == (0, 51.0, True, 2)
    assert (ollama.in_flight, ollama.latency_ms, ollama.manages_models) == (2, 182.5, True)
    assert (ollama.spare, ollama.healthy) == (1, True)
    by_name = {m.name: m for m in ollama.models}
    assert by_name["llama3.1:8b"].loaded
    assert by_name["llama3.1:8b"].loaded_bytes == 4_920_753_328
    assert by_name["bge-m3:latest"].capabilities == frozenset({"embed"})
    # A backend that does not answer is reported unhealthy, with what is known of it.
    assert (openai.healthy, openai.manages_models, openai.in_flight) == (False, False, 0)
    assert openai.error is not None and "cannot connect" in openai.error


def test_the_default_probe_works_on_a_machine_without_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    info = node_info({"sim": SimulatedBackend("sim")}, in_flight={}, latency={})
    assert info.gpus == ()
    assert info.memory is not None
    [sim] = info.backends
    assert (sim.in_flight, sim.latency_ms) == (0, None)


def test_published_heartbeat_reads_back_and_the_liveness_key_holds_the_instance(
    broker_url: str,
) -> None:
    info = node_info({"sim": SimulatedBackend("sim")}, in_flight={"sim": 1}, latency={"sim": 12.0})

    async def publish() -> None:
        client = Redis.from_url(broker_url)
        try:
            await publish_node_info(client, info)
        finally:
            await client.aclose()

    asyncio.run(publish())
    stored = redis.Redis.from_url(broker_url)
    raw = stored.hget(names.NODES_HASH, "gpu1")
    assert raw is not None
    assert NodeInfo.model_validate_json(raw) == info
    assert stored.get(names.node_alive_key("gpu1")) == b"3f1c9a"
    assert 0 < stored.pttl(names.node_alive_key("gpu1")) <= 1500  # three missed beats of 0.5 s


def test_a_busy_backend_too_slow_to_list_its_models_keeps_its_last_inventory() -> None:
    models = [FakeModel("llama3.1:8b"), FakeModel.embedding("bge-m3")]

    def described(info: NodeInfo) -> tuple[bool, str | None, list[str]]:
        (ollama,) = [b for b in info.backends if b.name == "ollama"]
        return ollama.healthy, ollama.error, [m.name for m in ollama.models]

    with running_fake_ollama(models) as fake:

        async def scenario(backends: dict[str, Backend]) -> NodeInfo:
            async def beat(in_flight: dict[str, int], previous: NodeInfo | None) -> NodeInfo:
                return await build_node_info(
                    CONFIG,
                    backends,
                    instance="3f1c9a",
                    in_flight=sum(in_flight.values()),
                    interval_s=0.5,
                    started_at=1_700_000_000.0,
                    backend_in_flight=in_flight,
                    backend_latency_ms={},
                    previous=previous,
                )

            first = await beat({}, None)
            assert described(first) == (True, None, ["llama3.1:8b", "bge-m3:latest"])
            # A long embedding batch holds the listing past the beat's timeout (0.5 s).
            fake.state.tags_delay = 1.0
            busy = await beat({"ollama": 1}, first)
            assert described(busy) == (True, None, ["llama3.1:8b", "bge-m3:latest"])
            still_busy = await beat({"ollama": 1}, busy)
            assert described(still_busy) == described(first)
            # With nothing of ours running there, a silent server is a problem worth showing.
            idle = await beat({}, still_busy)
            healthy, error, listed = described(idle)
            assert not healthy and listed == []
            assert error is not None and "no answer to the inventory request" in error
            return idle

        with_node_backends(fake.url, scenario)
