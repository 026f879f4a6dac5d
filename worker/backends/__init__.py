"""Backend adapters: one protocol, one adapter per kind of local LLM server."""

from worker.backends.base import Backend, BackendKind, Chunk, public_url
from worker.backends.simulated import SimulatedBackend

__all__ = ["Backend", "BackendKind", "Chunk", "SimulatedBackend", "public_url"]
