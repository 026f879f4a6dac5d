"""run_model_op against the fake Ollama on loopback (and the simulated backend): what the user
sees of a pull / warm / unload / rm, its progress, and the memory check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from broker.durations import keep_alive_seconds
from broker.errors import ModelNotFound, ModelOpError, ModelTooLarge, UnsupportedOperation
from broker.schemas import ModelOpKind, ModelOpRequest
from controller.localcluster import free_port
from tests.fakes.fake_ollama import FakeModel, FakeOllama, running_fake_ollama
from worker.backends.base import Backend
from worker.backends.ollama import OllamaBackend
from worker.backends.openai_compat import OpenAICompatBackend
from worker.backends.simulated import SimulatedBackend
from worker.model_ops import run_model_op

T = TypeVar("T")
GB = 1_000_000_000
LLAMA = FakeModel("llama3.1:8b", size=4_920_753_328, parameter_size="8.0B")


class Progress:
    """The ``emit`` callback: records each step with when it came."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int | None, int | None]] = []
        self.times: list[float] = []

    async def __call__(self, status: str, completed: int | None, total: int | None) -> None:
        self.steps.append((status, completed, total))
        self.times.append(time.monotonic())

    @property
    def statuses(self) -> list[str]:
        return [status for status, _, _ in self.steps]


def request(
    op: ModelOpKind,
    model: str,
    *,
    backend: str | None = None,
    force: bool = False,
    keep_alive: str | None = None,
) -> ModelOpRequest:
    return ModelOpRequest(
        op_id="op-12345678",
        node="gpu1",
        backend=backend,
        op=op,
        model=model,
        force=force,
        keep_alive=keep_alive,
        created_at=time.time(),
    )


def on_node(
    fake: FakeOllama | None,
    scenario: Callable[[dict[str, Backend]], Awaitable[T]],
) -> T:
    """Run ``scenario`` with the node's backends: an unreachable OpenAI-compatible server first,
    then the fake Ollama (when given)."""

    async def main() -> T:
        async with httpx.AsyncClient() as client:
            backends: dict[str, Backend] = {
                "openai": OpenAICompatBackend(
                    "openai", f"http://127.0.0.1:{free_port()}", client, capacity=1
                )
            }
            if fake is not None:
                backends["ollama"] = OllamaBackend("ollama", fake.url, client)
            return await scenario(backends)

    return asyncio.run(main())


def run(fake: FakeOllama | None, op: ModelOpRequest, free: int | None, progress: Progress) -> str:
    return on_node(fake, lambda backends: run_model_op(op, backends, free, progress))


# --- pull ----------------------------------------------------------------------------------


def test_pull_shows_progress_and_ends_with_the_models_size() -> None:
    progress = Progress()
    with running_fake_ollama([], registry=[LLAMA], pull_delay=0.03) as fake:
        summary = run(fake, request("pull", "llama3.1:8b"), 16 * GB, progress)
        assert "llama3.1:8b" in fake.state.models
    assert summary == "pulled llama3.1:8b (4.9 GB)"
    assert progress.steps[0] == ("pulling manifest", None, None)
    assert progress.steps[-1] == ("success", None, None)
    downloading = [(done, total) for _, done, total in progress.steps if total and total > GB]
    assert downloading, "the weights layer's progress is shown"


def test_pull_progress_is_throttled_but_keeps_the_first_and_last_steps() -> None:
    progress = Progress()
    with running_fake_ollama([], registry=[LLAMA], pull_delay=0.002) as fake:
        fake.state.pull_steps = 300  # a fast download: hundreds of lines a second
        started = time.monotonic()
        run(fake, request("pull", "llama3.1:8b"), None, progress)
        took = time.monotonic() - started
        lines = fake.state.pull_steps + 10
    assert len(progress.steps) < lines / 5
    assert len(progress.steps) <= took * 10 + 2
    gaps = [b - a for a, b in zip(progress.times, progress.times[1:-1], strict=False)]
    assert min(gaps) >= 0.09
    assert (progress.statuses[0], progress.statuses[-1]) == ("pulling manifest", "success")


def test_pull_of_a_model_too_big_for_free_memory_stops_the_download() -> None:
    progress = Progress()
    with running_fake_ollama([], registry=[LLAMA], pull_delay=0.05) as fake:
        with pytest.raises(ModelTooLarge) as caught:
            run(fake, request("pull", "llama3.1:8b"), 4 * GB, progress)
        assert fake.wait_until(lambda s: s.aborted_streams == 1)
        assert fake.state.models == {}
    message = str(caught.value)
    # The weights layer is 4.9 GB; loaded, a fifth more: 5.9 GB, against 4.0 GB free.
    assert "5.9 GB" in message
    assert "4.0 GB free" in message
    assert "force" in message
    assert "success" not in progress.statuses


def test_a_forced_pull_goes_ahead_whatever_the_memory() -> None:
    with running_fake_ollama([], registry=[LLAMA]) as fake:
        op = request("pull", "llama3.1:8b", force=True)
        assert run(fake, op, 1 * GB, Progress()) == "pulled llama3.1:8b (4.9 GB)"


def test_pull_with_unknown_free_memory_skips_the_check() -> None:
    with running_fake_ollama([], registry=[LLAMA]) as fake:
        assert run(fake, request("pull", "llama3.1:8b"), None, Progress()).startswith("pulled")


def test_pull_of_a_model_the_registry_lacks_is_model_not_found() -> None:
    with running_fake_ollama([]) as fake:
        fake.state.pull_failures["llama9:latest"] = "pull model manifest: file does not exist"
        with pytest.raises(ModelNotFound, match="llama9"):
            run(fake, request("pull", "llama9"), None, Progress())


# --- warm ----------------------------------------------------------------------------------


def test_warm_refuses_a_model_that_would_not_fit_and_sends_nothing() -> None:
    with running_fake_ollama([LLAMA]) as fake:
        with pytest.raises(ModelTooLarge) as caught:
            run(fake, request("warm", "llama3.1:8b"), 5 * GB, Progress())
        assert fake.state.requests_to("/api/generate") == []
    assert "5.9 GB" in str(caught.value)
    assert "5.0 GB free" in str(caught.value)


def test_warm_loads_for_good_unless_a_keep_alive_is_given() -> None:
    progress = Progress()
    with running_fake_ollama([LLAMA]) as fake:
        forever = run(fake, request("warm", "llama3.1:8b"), 16 * GB, progress)
        assert fake.state.last_body("/api/generate")["keep_alive"] == -1
        for_a_while = run(fake, request("warm", "llama3.1:8b", keep_alive="30m"), None, progress)
        assert fake.state.last_body("/api/generate")["keep_alive"] == "30m"
        assert fake.state.loaded == {"llama3.1:8b"}
    assert forever == "loaded llama3.1:8b (kept until unloaded)"
    assert for_a_while == "loaded llama3.1:8b (kept for 30m)"
    assert progress.statuses == ["loading llama3.1:8b", "loading llama3.1:8b"]


def test_warm_of_a_loaded_model_needs_no_room() -> None:
    with running_fake_ollama([LLAMA], loaded=["llama3.1:8b"]) as fake:
        assert run(fake, request("warm", "llama3.1:8b"), 1 * GB, Progress()).startswith("loaded")


def test_forced_warm_goes_ahead() -> None:
    with running_fake_ollama([LLAMA]) as fake:
        summary = run(fake, request("warm", "llama3.1:8b", force=True), 1 * GB, Progress())
        assert fake.state.loaded == {"llama3.1:8b"}
    assert summary == "loaded llama3.1:8b (kept until unloaded)"


def test_warm_with_an_unreadable_keep_alive_is_refused_before_any_request() -> None:
    with running_fake_ollama([LLAMA]) as fake:
        with pytest.raises(ModelOpError, match="not a duration"):
            run(fake, request("warm", "llama3.1:8b", keep_alive="a while"), None, Progress())
        assert fake.state.requests == []


# --- unload and rm -------------------------------------------------------------------------


def test_unload_then_rm() -> None:
    with running_fake_ollama([LLAMA], loaded=["llama3.1:8b"]) as fake:
        assert run(fake, request("unload", "llama3.1:8b"), None, Progress()) == (
            "unloaded llama3.1:8b"
        )
        assert fake.state.loaded == set()
        assert run(fake, request("rm", "llama3.1:8b"), None, Progress()) == "removed llama3.1:8b"
        assert fake.state.models == {}
        with pytest.raises(ModelNotFound, match=r"llama3\.1:8b"):
            run(fake, request("rm", "llama3.1:8b"), None, Progress())


# --- which backend -------------------------------------------------------------------------


def test_the_first_backend_that_manages_models_is_used() -> None:
    with running_fake_ollama([LLAMA]) as fake:
        run(fake, request("unload", "llama3.1:8b"), None, Progress())
        assert fake.state.requests_to("/api/generate") != []


def test_a_node_without_a_backend_that_manages_models_says_what_it_has() -> None:
    with pytest.raises(UnsupportedOperation) as caught:
        run(None, request("pull", "llama3.1:8b"), None, Progress())
    assert "no backend on node 'gpu1' can pull models" in str(caught.value)
    assert "openai (openai)" in str(caught.value)


def test_naming_a_backend_that_cannot_manage_models_is_unsupported() -> None:
    with running_fake_ollama([LLAMA]) as fake, pytest.raises(UnsupportedOperation) as caught:
        run(fake, request("warm", "llama3.1:8b", backend="openai"), None, Progress())
    assert "backend 'openai' on node 'gpu1' is openai" in str(caught.value)


def test_naming_a_backend_the_node_lacks_lists_the_ones_it_has() -> None:
    with running_fake_ollama([LLAMA]) as fake, pytest.raises(ModelOpError) as caught:
        run(fake, request("rm", "llama3.1:8b", backend="gpu0"), None, Progress())
    assert str(caught.value) == (
        "node 'gpu1' has no backend 'gpu0' (it has openai (openai), ollama (ollama))"
    )


# --- the simulated backend, as the demo uses it ---------------------------------------------


def test_the_simulated_backend_plays_the_whole_lifecycle() -> None:
    async def scenario() -> list[str]:
        backends: dict[str, Backend] = {"sim": SimulatedBackend("sim", pull_s=0.05)}
        summaries = []
        lifecycle: tuple[ModelOpKind, ...] = ("pull", "warm", "unload", "rm")
        for op in lifecycle:
            summaries.append(
                await run_model_op(request(op, "sim-vision"), backends, 24 * GB, Progress())
            )
        with pytest.raises(ModelTooLarge):
            await run_model_op(request("pull", "sim-huge"), backends, 24 * GB, Progress())
        return summaries

    assert asyncio.run(scenario()) == [
        "pulled sim-vision (2.8 GB)",
        "loaded sim-vision (kept until unloaded)",
        "unloaded sim-vision",
        "removed sim-vision",
    ]


# --- keep_alive, as Ollama reads it --------------------------------------------------------


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [
        ("-1", None),
        ("-1m", None),
        ("0", 0.0),
        ("0s", 0.0),
        ("300", 300.0),
        ("30m", 1800.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
    ],
)
def test_keep_alive_seconds(keep_alive: str, seconds: float | None) -> None:
    assert keep_alive_seconds(keep_alive) == seconds


@pytest.mark.parametrize("keep_alive", ["", "soon", "30 m", "1d", "nan", "inf", "m30"])
def test_keep_alive_that_is_not_a_duration(keep_alive: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        keep_alive_seconds(keep_alive)
