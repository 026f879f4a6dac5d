"""Backend adapters: one contract (``Backend``, optionally ``ModelManager``), one adapter per
transport (Ollama, OpenAI-compatible, Anthropic, Gemini, simulated), built by kind in
``registry``."""

from worker.backends.base import (
    Backend,
    BackendKind,
    Chunk,
    ModelManager,
    PullProgress,
    manages_models,
    model_manager,
    public_url,
)
from worker.backends.simulated import SimulatedBackend

__all__ = [
    "Backend",
    "BackendKind",
    "Chunk",
    "ModelManager",
    "PullProgress",
    "SimulatedBackend",
    "manages_models",
    "model_manager",
    "public_url",
]
