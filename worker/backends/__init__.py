"""Backend adapters: one protocol, one adapter per kind of local LLM server."""

from worker.backends.base import Backend, BackendKind, Chunk, PullProgress, public_url
from worker.backends.simulated import SimulatedBackend

__all__ = ["Backend", "BackendKind", "Chunk", "PullProgress", "SimulatedBackend", "public_url"]
