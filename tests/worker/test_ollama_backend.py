"""OllamaBackend against the fake Ollama on loopback (and httpx's MockTransport for the byte-level
oddities a well-behaved fake never sends).

What every adapter does (stream order and usage, options, unknown model, HTTP errors,
refused and dropped connections, errors mid-stream, bad JSON, cancel) is checked once for all
in tests/worker/backends/test_contract.py; this file keeps what is particular to this one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import httpx
import pytest

from broker.errors import (
    BackendError,
    BackendProtocolError,
    BackendUnavailable,
    ModelNotFound,
    ModelOpError,
)
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from controller.localcluster import free_port
from tests.fakes.fake_ollama import NOT_IN_REGISTRY, FakeModel, running_fake_ollama
from worker.backends.base import Chunk, PullProgress, model_manager
from worker.backends.ollama import OllamaBackend
from worker.backends.ollama_wire import context_length_from, loaded_until_from, ollama_keep_alive

T = TypeVar("T")
HELLO = (
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Hi there"),
)
NO_OPTIONS = GenerationOptions()


def with_backend(
    base_url: str, scenario: Callable[[OllamaBackend], Awaitable[T]], **client_kw: object
) -> T:
    """Run ``scenario`` on a fresh event loop with a backend on a client that is closed after."""

    async def main() -> T:
        async with httpx.AsyncClient(**client_kw) as client:  # type: ignore[arg-type]
            backend = OllamaBackend("pi-ollama", base_url, client, capacity=2)
            return await scenario(backend)

    return asyncio.run(main())


async def collect(
    backend: OllamaBackend, model: str = "llama3.2:1b", options: GenerationOptions = NO_OPTIONS
) -> list[Chunk]:
    return [chunk async for chunk in backend.stream_chat(model, HELLO, options)]


async def collect_until_error(
    backend: OllamaBackend, model: str = "llama3.2:1b"
) -> tuple[list[Chunk], BackendError]:
    received: list[Chunk] = []
    try:
        async for chunk in backend.stream_chat(model, HELLO, NO_OPTIONS):
            received.append(chunk)
    except BackendError as exc:
        return received, exc
    raise AssertionError(f"the stream ended without an error after {received}")


# --- identity ------------------------------------------------------------------------------


def test_url_is_public_and_kind_is_ollama() -> None:
    async def scenario(backend: OllamaBackend) -> tuple[str, str, int]:
        return backend.url, backend.kind, backend.capacity

    url, kind, capacity = with_backend("http://admin:hunter22@pi.lan:11434/", scenario)
    assert (url, kind, capacity) == ("http://pi.lan:11434", "ollama", 2)


# --- inventory -----------------------------------------------------------------------------


def test_inventory_lists_installed_models_and_marks_loaded_ones() -> None:
    models = [
        FakeModel(
            "llama3.2:1b",
            size=1_321_098_329,
            parameter_size="1.2B",
            quantization_level="Q8_0",
            loaded_size=2_400_000_000,
            size_vram=1_500_000_000,
        ),
        FakeModel("qwen2.5:0.5b", size=397_821_319, family="qwen2", parameter_size="494.03M"),
    ]
    with running_fake_ollama(models, loaded=["llama3.2:1b"]) as fake:
        inventory = with_backend(fake.url, lambda b: b.inventory())
    loaded_until = inventory[0].loaded_until
    # Loaded by an earlier request without keep_alive: Ollama's default of five minutes.
    assert loaded_until is not None
    assert loaded_until == pytest.approx(time.time() + 300, abs=30)
    assert inventory == [
        ModelInfo(
            name="llama3.2:1b",
            loaded=True,
            size_bytes=1_321_098_329,
            family="llama",
            parameter_size="1.2B",
            quantization="Q8_0",
            context_length=131072,
            capabilities=frozenset({"chat", "tools"}),
            loaded_until=loaded_until,
            loaded_bytes=2_400_000_000,
            loaded_vram_bytes=1_500_000_000,
        ),
        ModelInfo(
            name="qwen2.5:0.5b",
            loaded=False,
            size_bytes=397_821_319,
            family="qwen2",
            parameter_size="494.03M",
            quantization="Q8_0",
            context_length=131072,
            capabilities=frozenset({"chat", "tools"}),
        ),
    ]


def test_inventory_maps_capabilities_and_context_length_from_show() -> None:
    models = [
        FakeModel("llama3.2:1b", capabilities=("completion", "tools", "insert")),
        FakeModel(
            "qwen3:4b", capabilities=("completion", "tools", "thinking"), context_length=40960
        ),
        FakeModel.embedding("nomic-embed-text"),
        FakeModel.vision("gemma3:4b"),
    ]
    with running_fake_ollama(models) as fake:
        inventory = with_backend(fake.url, lambda b: b.inventory())
    facts = {m.name: (m.capabilities, m.context_length, m.serves_chat()) for m in inventory}
    assert facts == {
        "llama3.2:1b": (frozenset({"chat", "tools", "insert"}), 131072, True),
        "qwen3:4b": (frozenset({"chat", "tools", "thinking"}), 40960, True),
        "nomic-embed-text:latest": (frozenset({"embed"}), 2048, False),
        # Its image encoder's own clip.vision.context_length (256) is not the model's.
        "gemma3:4b": (frozenset({"chat", "vision"}), 131072, True),
    }


def test_show_is_asked_once_per_model_version_not_on_every_heartbeat() -> None:
    with running_fake_ollama(["llama3.2:1b", "qwen2.5:0.5b"]) as fake:

        async def scenario(backend: OllamaBackend) -> list[ModelInfo]:
            for _ in range(3):
                await backend.inventory()
            assert len(fake.state.requests_to("/api/show")) == 2
            # A new version of one model (a re-pull changed its digest) is shown again.
            current = fake.state.models["qwen2.5:0.5b"]
            fake.state.models["qwen2.5:0.5b"] = dataclasses.replace(
                current, revision=1, capabilities=("completion", "vision")
            )
            for _ in range(2):
                latest = await backend.inventory()
            return latest

        latest = with_backend(fake.url, scenario)
        shown = [r.body["model"] for r in fake.state.requests_to("/api/show")]
    # Asked concurrently at first, so in either order; then only the changed model.
    assert sorted(shown[:2]) == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert shown[2:] == ["qwen2.5:0.5b"]
    assert latest[1].capabilities == frozenset({"chat", "vision"})


def test_a_show_that_fails_leaves_capabilities_unknown_and_is_not_retried_at_once() -> None:
    shows = 0

    def respond(request: httpx.Request) -> httpx.Response:
        nonlocal shows
        if request.url.path == "/api/tags":
            return httpx.Response(200, json={"models": [{"name": "m:1b", "digest": "abc"}]})
        if request.url.path == "/api/ps":
            return httpx.Response(200, json={"models": []})
        shows += 1
        return httpx.Response(500, json={"error": "failed to read model metadata"})

    async def scenario(backend: OllamaBackend) -> list[list[ModelInfo]]:
        return [await backend.inventory() for _ in range(3)]

    rounds = with_backend(
        "http://ollama.test:11434", scenario, transport=httpx.MockTransport(respond)
    )
    assert rounds[-1] == [ModelInfo(name="m:1b")]
    assert shows == 1


def test_a_chat_loads_the_model_so_inventory_shows_it_loaded() -> None:
    async def scenario(backend: OllamaBackend) -> tuple[list[ModelInfo], list[ModelInfo]]:
        before = await backend.inventory()
        await collect(backend, model="qwen2.5:0.5b")
        return before, await backend.inventory()

    with running_fake_ollama() as fake:
        before, after = with_backend(fake.url, scenario)
    assert [m.loaded for m in before] == [False, False]
    assert {m.name: m.loaded for m in after} == {"llama3.2:1b": False, "qwen2.5:0.5b": True}


def test_untagged_names_match_latest_between_tags_and_ps() -> None:
    with running_fake_ollama(["mistral"], loaded=["mistral"]) as fake:
        inventory = with_backend(fake.url, lambda b: b.inventory())
    assert [(m.name, m.loaded) for m in inventory] == [("mistral:latest", True)]


def test_inventory_on_server_error_raises_protocol_error() -> None:
    expected = "HTTP 500: an internal error occurred"
    with (
        running_fake_ollama(fail_status=500) as fake,
        pytest.raises(BackendProtocolError, match=expected),
    ):
        with_backend(fake.url, lambda b: b.inventory())


# --- model lifecycle: load / unload / pull / delete -------------------------------------------


def test_ollama_manages_models() -> None:
    backend = OllamaBackend("gpu0", "http://ollama.test:11434", httpx.AsyncClient())
    assert model_manager(backend) is backend


def test_load_without_keep_alive_keeps_the_model_loaded_for_good() -> None:
    async def scenario(backend: OllamaBackend) -> ModelInfo:
        await backend.load("qwen2.5:0.5b")
        return (await backend.inventory())[1]

    with running_fake_ollama() as fake:
        qwen = with_backend(fake.url, scenario)
        body = fake.state.last_body("/api/generate")
    # A number, as Ollama needs: the string "-1" is refused for its missing unit.
    assert body == {"model": "qwen2.5:0.5b", "keep_alive": -1, "stream": False}
    assert qwen.loaded
    assert qwen.loaded_until is None  # Ollama's ~292 years away reads as "forever"


@pytest.mark.parametrize(
    ("keep_alive", "sent", "seconds"), [("30m", "30m", 1800), ("300", 300, 300), ("1h", "1h", 3600)]
)
def test_load_with_keep_alive_reports_when_the_model_unloads(
    keep_alive: str, sent: object, seconds: int
) -> None:
    async def scenario(backend: OllamaBackend) -> ModelInfo:
        await backend.load("llama3.2:1b", keep_alive)
        return (await backend.inventory())[0]

    with running_fake_ollama() as fake:
        llama = with_backend(fake.url, scenario)
        assert fake.state.last_body("/api/generate")["keep_alive"] == sent
    assert llama.loaded
    assert llama.loaded_until == pytest.approx(time.time() + seconds, abs=30)


def test_load_with_an_unreadable_keep_alive_is_refused_before_any_request() -> None:
    with running_fake_ollama() as fake:
        with pytest.raises(ModelOpError, match="not a duration"):
            with_backend(fake.url, lambda b: b.load("llama3.2:1b", "soon"))
        assert fake.state.requests == []


def test_load_of_an_embedding_model_goes_through_embed() -> None:
    async def scenario(backend: OllamaBackend) -> list[ModelInfo]:
        await backend.load("nomic-embed-text", "10m")
        return await backend.inventory()

    with running_fake_ollama([FakeModel.embedding("nomic-embed-text")]) as fake:
        [embedder] = with_backend(fake.url, scenario)
        assert fake.state.last_body("/api/embed") == {
            "model": "nomic-embed-text",
            "input": [],
            "keep_alive": "10m",
        }
    assert embedder.loaded
    assert embedder.capabilities == frozenset({"embed"})


def test_load_of_a_missing_model_raises_model_not_found() -> None:
    with running_fake_ollama() as fake, pytest.raises(ModelNotFound, match="gemma3:27b"):
        with_backend(fake.url, lambda b: b.load("gemma3:27b"))


def test_unload_frees_the_memory_and_keeps_the_model() -> None:
    async def scenario(backend: OllamaBackend) -> list[ModelInfo]:
        await backend.unload("llama3.2:1b")
        # Embedding models unload the same way: Ollama checks keep_alive 0 before capabilities.
        await backend.unload("nomic-embed-text")
        return await backend.inventory()

    with running_fake_ollama([FakeModel.embedding("nomic-embed-text"), "llama3.2:1b"]) as fake:
        fake.state.loaded.update({"nomic-embed-text:latest", "llama3.2:1b"})
        inventory = with_backend(fake.url, scenario)
        assert fake.state.last_body("/api/generate") == {
            "model": "nomic-embed-text",
            "keep_alive": 0,
            "stream": False,
        }
    assert [(m.name, m.loaded, m.loaded_bytes) for m in inventory] == [
        ("nomic-embed-text:latest", False, None),
        ("llama3.2:1b", False, None),
    ]


def test_delete_removes_the_model_and_a_second_delete_is_model_not_found() -> None:
    async def scenario(backend: OllamaBackend) -> list[str]:
        await backend.delete("qwen2.5:0.5b")
        return [m.name for m in await backend.inventory()]

    with running_fake_ollama() as fake:
        assert with_backend(fake.url, scenario) == ["llama3.2:1b"]
        with pytest.raises(ModelNotFound, match=r"qwen2\.5:0\.5b"):
            with_backend(fake.url, lambda b: b.delete("qwen2.5:0.5b"))


async def pull_all(backend: OllamaBackend, model: str) -> list[PullProgress]:
    return [step async for step in backend.pull(model)]


def test_pull_reports_each_layer_downloading_then_success_and_installs_the_model() -> None:
    size = 2_019_393_189
    with running_fake_ollama([], registry=[FakeModel("llama3.2:3b", size=size)]) as fake:
        steps = with_backend(fake.url, lambda b: pull_all(b, "llama3.2:3b"))
        inventory = with_backend(fake.url, lambda b: b.inventory())
        assert fake.state.last_body("/api/pull") == {"model": "llama3.2:3b", "stream": True}
    assert steps[0] == PullProgress(status="pulling manifest")
    assert [s.status for s in steps[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layers = {s.digest: s.total for s in steps if s.digest is not None}
    assert len(layers) == 4
    assert sum(t or 0 for t in layers.values()) == size
    weights_digest = max(layers, key=lambda d: layers[d] or 0)
    weights = [s for s in steps if s.digest == weights_digest]
    assert weights[0].completed is None  # nothing downloaded yet
    completed = [s.completed or 0 for s in weights[1:]]
    assert completed == sorted(completed)
    assert completed[-1] == weights[0].total
    assert {s.status for s in weights} == {f"pulling {weights_digest[len('sha256:') :][:12]}"}
    assert [(m.name, m.size_bytes) for m in inventory] == [("llama3.2:3b", size)]


def test_pull_of_a_model_the_registry_lacks_raises_model_not_found() -> None:
    with running_fake_ollama([]) as fake:
        fake.state.pull_failures["llama9:latest"] = NOT_IN_REGISTRY
        with pytest.raises(ModelNotFound) as caught:
            with_backend(fake.url, lambda b: pull_all(b, "llama9"))
        assert fake.state.models == {}
    assert "llama9" in str(caught.value)
    assert "file does not exist" in str(caught.value)


def test_pull_failing_mid_download_raises_protocol_error_with_ollama_words() -> None:
    with running_fake_ollama([]) as fake:
        fake.state.pull_failures["phi3:latest"] = "max retries exceeded: unexpected EOF"
        with pytest.raises(BackendProtocolError, match="max retries exceeded: unexpected EOF"):
            with_backend(fake.url, lambda b: pull_all(b, "phi3"))


def test_pull_stream_that_ends_without_success_raises_protocol_error() -> None:
    body = b'{"status":"pulling manifest"}\n{"status":"pulling 6a0746a1ec1a","total":10}\n'
    error = mock_backend(body, lambda b: _pull_error(b, "phi3"))
    assert isinstance(error, BackendProtocolError)
    assert "without reporting success" in str(error)


async def _pull_error(backend: OllamaBackend, model: str) -> BackendError:
    try:
        await pull_all(backend, model)
    except BackendError as exc:
        return exc
    raise AssertionError("the pull ended without an error")


def test_closing_a_pull_early_abandons_the_download_on_the_server() -> None:
    async def scenario(backend: OllamaBackend) -> PullProgress:
        pull = backend.pull("llama3.2:3b")
        async for step in pull:
            if step.total is not None:
                await pull.aclose()
                return step
        raise AssertionError("no layer was reported")

    with running_fake_ollama([], pull_delay=0.2) as fake:
        first_layer = with_backend(fake.url, scenario)
        assert fake.wait_until(lambda s: s.aborted_streams == 1)
        assert fake.state.models == {}  # never installed
    assert first_layer.completed is None


# --- reading Ollama's fields ------------------------------------------------------------------

NOW = datetime(2024, 6, 4, 21, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("expires_at", "expected"),
    [
        ("2024-06-04T14:38:31.83753-07:00", datetime(2024, 6, 4, 21, 38, 31, 837530, UTC)),
        ("2024-06-04T21:38:31.837530123Z", datetime(2024, 6, 4, 21, 38, 31, 837530, UTC)),
        ("2316-09-17T12:47:27.312417-07:00", None),  # keep_alive -1: now + 292 years
        ("0001-01-01T00:00:00Z", None),  # Go's zero time, while a model is still loading
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_expires_at_reads_as_epoch_seconds_or_none(
    expires_at: str | None, expected: datetime | None
) -> None:
    until = loaded_until_from(expires_at, NOW)
    assert until == (expected.timestamp() if expected else None)


def test_context_length_prefers_the_architecture_key() -> None:
    info = {
        "general.architecture": "gemma3",
        "clip.vision.context_length": 256,
        "gemma3.context_length": 131072,
    }
    assert context_length_from(info) == 131072
    assert context_length_from({"bert.context_length": 2048}) == 2048
    assert context_length_from({"general.architecture": "llama"}) is None


@pytest.mark.parametrize(
    ("keep_alive", "wire"),
    [("-1", -1), ("0", 0), ("1.5", 1.5), ("30m", "30m"), ("1h30m", "1h30m"), ("-1m", "-1m")],
)
def test_keep_alive_travels_as_ollama_reads_it(keep_alive: str, wire: object) -> None:
    sent = ollama_keep_alive(keep_alive)
    assert (sent, type(sent)) == (wire, type(wire))


@pytest.mark.parametrize("keep_alive", ["soon", "5 minutes", "m", "", "1d"])
def test_keep_alive_that_ollama_would_refuse_is_a_value_error(keep_alive: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        ollama_keep_alive(keep_alive)


# --- streaming -----------------------------------------------------------------------------


def test_no_options_object_when_nothing_is_set() -> None:
    with running_fake_ollama() as fake:
        with_backend(fake.url, collect)
        assert "options" not in fake.state.last_body("/api/chat")


# --- errors --------------------------------------------------------------------------------


def test_plain_404_from_a_wrong_base_url_is_not_model_not_found() -> None:
    expected = "HTTP 404: 404 page not found"
    with running_fake_ollama() as fake, pytest.raises(BackendProtocolError, match=expected):
        with_backend(f"{fake.url}/wrong-prefix", collect)


def test_refused_connection_raises_unavailable_without_credentials() -> None:
    base_url = f"http://corral:sup3rsecret@127.0.0.1:{free_port()}"
    for call in (collect, lambda b: b.inventory()):
        with pytest.raises(BackendUnavailable) as caught:
            with_backend(base_url, call)
        message = str(caught.value)
        assert f"127.0.0.1:{base_url.rsplit(':', 1)[1]}" in message
        assert "sup3rsecret" not in message
        assert "corral:" not in message
        assert caught.value.__cause__ is None


# --- cancellation --------------------------------------------------------------------------


def test_closing_the_iterator_early_closes_the_stream_on_the_server() -> None:
    async def scenario(backend: OllamaBackend) -> str:
        stream = backend.stream_chat("llama3.2:1b", HELLO, NO_OPTIONS)
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        return first.text

    with running_fake_ollama(token_delay=0.2) as fake:
        assert with_backend(fake.url, scenario) == "The"
        assert fake.wait_until(lambda s: s.aborted_streams == 1)


# --- byte-level oddities (MockTransport) ---------------------------------------------------


def mock_backend(body: bytes, scenario: Callable[[OllamaBackend], Awaitable[T]]) -> T:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})

    return with_backend(
        "http://ollama.test:11434", scenario, transport=httpx.MockTransport(respond)
    )


def test_a_stream_that_ends_without_done_raises_protocol_error() -> None:
    body = b'{"message":{"role":"assistant","content":"ok"},"done":false}\n'
    _, error = mock_backend(body, collect_until_error)
    assert isinstance(error, BackendProtocolError)
    assert "without its final 'done' line" in str(error)


def test_text_on_the_done_line_is_kept() -> None:
    body = (
        b'{"message":{"role":"assistant","content":""},"done":false}\n'
        b'{"message":{"role":"assistant","content":"all at once"},"done":true,'
        b'"done_reason":"stop","prompt_eval_count":3,"eval_count":3}\n'
    )
    chunks = mock_backend(body, collect)
    assert chunks == [
        Chunk(
            text="all at once",
            done=True,
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=3,
        )
    ]


# --- the fake itself keeps to Ollama's documented API --------------------------------------


def test_fake_answers_the_documented_endpoints() -> None:
    with running_fake_ollama(["llama3.2:1b"]) as fake, httpx.Client(base_url=fake.url) as http:
        assert http.get("/api/version").json() == {"version": fake.state.version}
        chat = http.post(
            "/api/chat",
            json={
                "model": "llama3.2:1b",
                "messages": [{"role": "user", "content": "x"}],
                "stream": False,
            },
        ).json()
        assert chat["done"] is True
        assert chat["message"] == {"role": "assistant", "content": fake.state.reply}
        assert chat["eval_count"] == len(fake.state.reply.split())

        generated = http.post("/api/generate", json={"model": "llama3.2:1b", "prompt": "x"})
        assert generated.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in generated.text.splitlines()]
        assert "".join(line["response"] for line in lines) == fake.state.reply
        assert lines[-1]["done_reason"] == "stop"
        assert "context" in lines[-1]

        embedded = http.post("/api/embed", json={"model": "llama3.2:1b", "input": ["a", "b"]})
        assert len(embedded.json()["embeddings"]) == 2

        shown = http.post("/api/show", json={"model": "llama3.2:1b"}).json()
        assert shown["details"]["family"] == "llama"


def test_fake_pull_streams_status_lines_and_installs_the_model() -> None:
    with running_fake_ollama([]) as fake, httpx.Client(base_url=fake.url) as http:
        pulled = http.post("/api/pull", json={"model": "phi3"})
        statuses = [json.loads(line)["status"] for line in pulled.text.splitlines()]
        assert statuses[0] == "pulling manifest"
        assert statuses[-1] == "success"
        assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["phi3:latest"]


def test_fake_error_bodies_and_status_codes() -> None:
    with running_fake_ollama() as fake, httpx.Client(base_url=fake.url) as http:
        missing = http.post("/api/show", json={"model": "nope"})
        assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})
        bad = http.post("/api/chat", content=b"{not json")
        assert bad.status_code == 400
        assert "error" in bad.json()
        no_model = http.post("/api/chat", json={"messages": []})
        assert (no_model.status_code, no_model.json()) == (400, {"error": "model is required"})
        unknown_path = http.get("/api/nothing-here")
        assert (unknown_path.status_code, unknown_path.text) == (404, "404 page not found")


def test_fake_chat_without_messages_loads_and_keep_alive_zero_unloads() -> None:
    with running_fake_ollama() as fake, httpx.Client(base_url=fake.url) as http:
        loaded = http.post("/api/chat", json={"model": "llama3.2:1b", "messages": []}).json()
        assert loaded["done_reason"] == "load"
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == ["llama3.2:1b"]
        unloaded = http.post(
            "/api/chat", json={"model": "llama3.2:1b", "messages": [], "keep_alive": 0}
        ).json()
        assert unloaded["done_reason"] == "unload"
        assert http.get("/api/ps").json()["models"] == []


def test_fake_keep_alive_follows_ollama_duration_rules() -> None:
    with running_fake_ollama() as fake, httpx.Client(base_url=fake.url) as http:
        unitless = http.post("/api/generate", json={"model": "llama3.2:1b", "keep_alive": "-1"})
        assert (unitless.status_code, unitless.json()) == (
            400,
            {"error": 'time: missing unit in duration "-1"'},
        )
        forever = http.post("/api/generate", json={"model": "llama3.2:1b", "keep_alive": -1})
        assert forever.json()["done_reason"] == "load"
        [running] = http.get("/api/ps").json()["models"]
        expires = datetime.fromisoformat(running["expires_at"])
        assert expires.year > datetime.now(UTC).year + 290
        assert expires.utcoffset() is not None


def test_fake_embedding_model_refuses_chat_and_loads_through_embed() -> None:
    with (
        running_fake_ollama([FakeModel.embedding("all-minilm")]) as fake,
        httpx.Client(base_url=fake.url) as http,
    ):
        chat = http.post(
            "/api/chat",
            json={"model": "all-minilm", "messages": [{"role": "user", "content": "x"}]},
        )
        assert (chat.status_code, chat.json()) == (
            400,
            {"error": '"all-minilm" does not support chat'},
        )
        loaded = http.post("/api/embed", json={"model": "all-minilm"}).json()
        assert loaded["embeddings"] == []
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == ["all-minilm:latest"]
        shown = http.post("/api/show", json={"model": "all-minilm"}).json()
        assert shown["capabilities"] == ["embedding"]


def test_fake_pull_without_streaming_reports_failure_in_one_body() -> None:
    with running_fake_ollama([]) as fake, httpx.Client(base_url=fake.url) as http:
        fake.state.pull_failures["nope:latest"] = NOT_IN_REGISTRY
        failed = http.post("/api/pull", json={"model": "nope", "stream": False})
        assert (failed.status_code, failed.json()) == (500, {"error": NOT_IN_REGISTRY})
        pulled = http.post("/api/pull", json={"model": "phi3", "stream": False})
        assert pulled.json() == {"status": "success"}
        deleted = http.request("DELETE", "/api/delete", json={"model": "phi3"})
        assert (deleted.status_code, deleted.content) == (200, b"")
        assert http.get("/api/tags").json()["models"] == []
