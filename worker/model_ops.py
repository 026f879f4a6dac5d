"""Running one model lifecycle operation (pull / warm / unload / rm) on a node's backend.

A plain function over the node's backends, so it can be tested without Celery or Redis: the
caller passes how much memory is free and an ``emit`` callback that publishes each progress
step, and gets back the one-line summary the user sees at the end.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing

from broker.durations import keep_alive_seconds
from broker.errors import ModelOpError, ModelTooLarge, UnsupportedOperation
from broker.schemas import ModelOpRequest, same_model
from broker.sizing import estimate_load_bytes, gigabytes
from worker.backends.base import (
    KEEP_LOADED_FOREVER,
    Backend,
    ModelManager,
    PullProgress,
    model_manager,
)

__all__ = ["Emit", "human_bytes", "run_model_op"]

Emit = Callable[[str, int | None, int | None], Awaitable[None]]
"""``emit(status, completed, total)``: publish one progress step."""

PULL_EMITS_PER_S = 10.0
"""Download progress arrives many times a second; the user needs a few updates a second."""


def human_bytes(count: int) -> str:
    """``4.7 GB``, ``397 MB``: decimal units, as Ollama and disk vendors count."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f} GB"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f} MB"
    return f"{count / 1e3:.0f} kB"


async def run_model_op(
    request: ModelOpRequest,
    backends: Mapping[str, Backend],
    free_memory_bytes: int | None,
    emit: Emit,
) -> str:
    """Run ``request`` on the backend it names (or the node's first that manages models).

    ``free_memory_bytes`` is what a new model could use on this node (None: unknown, and the
    memory check is skipped). A ``warm`` or ``pull`` of a model whose estimated footprint does
    not fit raises ModelTooLarge unless ``request.force``. Returns a one-line summary such as
    ``"pulled llama3:8b (4.7 GB)"``.

    Raises UnsupportedOperation when no backend here can manage models, ModelOpError for a bad
    request, and the backend's BackendError (ModelNotFound, ...) when the backend fails.
    """
    backend = choose_backend(request, backends)
    limit = None if request.force else free_memory_bytes
    if request.op == "pull":
        return await _pull(backend, request.model, limit, emit)
    if request.op == "warm":
        return await _warm(backend, request.model, request.keep_alive, limit, emit)
    if request.op == "unload":
        await backend.unload(request.model)
        return f"unloaded {request.model}"
    await backend.delete(request.model)
    return f"removed {request.model}"


def choose_backend(request: ModelOpRequest, backends: Mapping[str, Backend]) -> ModelManager:
    if request.backend is not None:
        backend = backends.get(request.backend)
        if backend is None:
            raise ModelOpError(
                f"node {request.node!r} has no backend {request.backend!r} "
                f"(it has {_describe(backends)})"
            )
        manager = model_manager(backend)
        if manager is None:
            raise UnsupportedOperation(
                f"backend {backend.name!r} on node {request.node!r} is {backend.kind}, "
                f"which cannot {request.op} models (an ollama backend can)"
            )
        return manager
    for backend in backends.values():
        if (manager := model_manager(backend)) is not None:
            return manager
    raise UnsupportedOperation(
        f"no backend on node {request.node!r} can {request.op} models: it has "
        f"{_describe(backends)}, and only ollama (or simulated) backends manage models"
    )


def _describe(backends: Mapping[str, Backend]) -> str:
    return ", ".join(f"{b.name} ({b.kind})" for b in backends.values()) or "none"


def _too_large(model: str, estimate: int, free: int, *, basis: str, op: str) -> ModelTooLarge:
    return ModelTooLarge(
        f"{model} would need about {gigabytes(estimate)} of memory once loaded ({basis}), but "
        f"the node has {gigabytes(free)} free; force the {op} to go ahead anyway"
    )


async def _warm(
    backend: ModelManager, model: str, keep_alive: str | None, limit: int | None, emit: Emit
) -> str:
    keep = keep_alive or KEEP_LOADED_FOREVER
    try:
        seconds = keep_alive_seconds(keep)
    except ValueError as exc:
        raise ModelOpError(str(exc)) from None
    if limit is not None:
        installed = next((m for m in await backend.inventory() if same_model(m.name, model)), None)
        # Already loaded: it fits, by definition. Not installed: the backend says so below.
        if installed is not None and not installed.loaded and installed.size_bytes:
            estimate = estimate_load_bytes(installed.size_bytes)
            if estimate > limit:
                weights = human_bytes(installed.size_bytes)
                raise _too_large(
                    model, estimate, limit, basis=f"{weights} of weights, plus 20%", op="warm"
                )
    await emit(f"loading {model}", None, None)
    await backend.load(model, keep)
    if seconds is None:
        return f"loaded {model} (kept until unloaded)"
    if seconds == 0:
        return f"unloaded {model}"
    return f"loaded {model} (kept for {keep})"


class _Throttle:
    """Lets a progress step through at most ``per_s`` times a second; holds back the rest."""

    def __init__(self, per_s: float) -> None:
        self._gap_s = 1.0 / per_s
        self._last: float | None = None

    def allows(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._gap_s:
            return False
        self._last = now
        return True


async def _pull(backend: ModelManager, model: str, limit: int | None, emit: Emit) -> str:
    layers: dict[str, int] = {}  # digest -> size: the model's size on disk when done
    throttle = _Throttle(PULL_EMITS_PER_S)
    held: PullProgress | None = None
    async with aclosing(backend.pull(model)) as steps:
        async for step in steps:
            if step.digest is not None and step.total is not None:
                layers[step.digest] = step.total
                # The weights are one layer, by far the largest: as soon as its size is known
                # we can tell whether the model could ever be loaded here. Leaving the
                # ``async with`` closes the stream, and Ollama abandons the download.
                estimate = estimate_load_bytes(step.total)
                if limit is not None and estimate > limit:
                    layer = human_bytes(step.total)
                    raise _too_large(
                        model, estimate, limit, basis=f"a {layer} layer, plus 20%", op="pull"
                    )
            if throttle.allows():
                await emit(step.status, step.completed, step.total)
                held = None
            else:
                held = step
    if held is not None:
        await emit(held.status, held.completed, held.total)  # the last step is always shown
    return f"pulled {model} ({human_bytes(sum(layers.values()))})"
