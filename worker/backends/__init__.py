"""Backend adapters: one contract (``Backend``, optionally ``ModelManager``), one adapter per
transport (Ollama, OpenAI-compatible, Anthropic, Gemini, simulated), built by kind in
``registry``, which imports an adapter only when a node builds one."""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> object:
    # The simulated backend loads on first use, like every adapter (not with the package).
    if name == "SimulatedBackend":
        from worker.backends.simulated import SimulatedBackend  # noqa: PLC0415

        return SimulatedBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
