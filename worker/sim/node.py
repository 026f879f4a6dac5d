"""One simulated node agent: its backend, load, running jobs and identity (see ``fleet``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from broker.errors import BackendUnavailable
from broker.schemas import ChatMessage, GenerationOptions, MemoryInfo, ToolDefinition
from worker.backends.base import Backend, Chunk
from worker.backends.simulated import SimulatedBackend
from worker.config import SimulatedSpec, WorkerConfig
from worker.jobs import JobControl
from worker.runtime import BackendLoad
from worker.sim.profiles import NodeProfile
from worker.sysinfo import SystemProbe, SystemSnapshot

BACKEND_NAME = "sim"


class FailingBackend(SimulatedBackend):
    """A backend whose server is gone: every chat fails as a refused connection would."""

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        raise BackendUnavailable(f"simulated failure: backend {self.name!r} does not answer")
        yield Chunk(text="")  # an async generator, like the real one


class _ProfileProbe(SystemProbe):
    """The machine a profile describes, instead of the one the fleet runs on."""

    def __init__(self, profile: NodeProfile) -> None:
        super().__init__()
        self._memory = profile.memory_bytes

    async def snapshot(self) -> SystemSnapshot:
        return SystemSnapshot(
            memory=MemoryInfo(total_bytes=self._memory, available_bytes=self._memory // 2),
            gpus=(),
            cpu_load=0.1,
        )


class SimNode:
    """One simulated node agent: its backend, load, running jobs and identity."""

    def __init__(self, profile: NodeProfile) -> None:
        self.profile = profile
        self.name = profile.name
        spec = SimulatedSpec(
            kind="simulated",
            name=BACKEND_NAME,
            capacity=profile.capacity,
            first_token_s=profile.first_token_s,
            token_s=profile.token_s,
        )
        self.config = WorkerConfig(name=profile.name, tags=profile.tags, backends=(spec,))
        backend_class = FailingBackend if profile.failing else SimulatedBackend
        self.backends: dict[str, Backend] = {
            BACKEND_NAME: backend_class(
                BACKEND_NAME,
                first_token_s=profile.first_token_s,
                token_s=profile.token_s,
                models=profile.models,
                capacity=profile.capacity,
            )
        }
        self.load = BackendLoad(profile.capacity)
        self.probe = _ProfileProbe(profile)
        self.instance = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.active: dict[str, JobControl] = {}
        self.killed = False
        self.stored_inventory: str | None = None
