"""OllamaBackend against the fake Ollama on loopback (and httpx's MockTransport for the byte-level
oddities a well-behaved fake never sends)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from broker.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
)
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from tests.fakes.fake_ollama import FakeModel, running_fake_ollama
from tests.support.servers import free_port
from worker.backends.base import Chunk
from worker.backends.ollama import OllamaBackend

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
            "llama3.2:1b", size=1_321_098_329, parameter_size="1.2B", quantization_level="Q8_0"
        ),
        FakeModel("qwen2.5:0.5b", size=397_821_319, family="qwen2", parameter_size="494.03M"),
    ]
    with running_fake_ollama(models, loaded=["llama3.2:1b"]) as fake:
        inventory = with_backend(fake.url, lambda b: b.inventory())
    assert inventory == [
        ModelInfo(
            name="llama3.2:1b",
            loaded=True,
            size_bytes=1_321_098_329,
            family="llama",
            parameter_size="1.2B",
            quantization="Q8_0",
        ),
        ModelInfo(
            name="qwen2.5:0.5b",
            loaded=False,
            size_bytes=397_821_319,
            family="qwen2",
            parameter_size="494.03M",
            quantization="Q8_0",
        ),
    ]


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


# --- streaming -----------------------------------------------------------------------------


def test_stream_yields_the_reply_in_order_then_a_final_chunk_with_usage() -> None:
    with running_fake_ollama(reply="Hello from the fake, corral!") as fake:
        chunks = with_backend(fake.url, collect)
    assert [c.text for c in chunks[:-1]] == ["Hello", " from", " the", " fake,", " corral!"]
    assert not any(c.done for c in chunks[:-1])
    assert chunks[-1] == Chunk(
        text="", done=True, finish_reason="stop", prompt_tokens=4, completion_tokens=5
    )


def test_options_map_to_ollama_options_and_num_predict_limits_the_answer() -> None:
    options = GenerationOptions(temperature=0.2, seed=42, stop=("\n\n", "User:"), max_tokens=3)
    with running_fake_ollama(reply="one two three four five") as fake:
        chunks = with_backend(fake.url, lambda b: collect(b, options=options))
        body = fake.state.last_body("/api/chat")
    assert body["stream"] is True
    assert body["model"] == "llama3.2:1b"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert body["options"] == {
        "temperature": 0.2,
        "seed": 42,
        "num_predict": 3,
        "stop": ["\n\n", "User:"],
    }
    assert "".join(c.text for c in chunks) == "one two three"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3


def test_no_options_object_when_nothing_is_set() -> None:
    with running_fake_ollama() as fake:
        with_backend(fake.url, collect)
        assert "options" not in fake.state.last_body("/api/chat")


# --- errors --------------------------------------------------------------------------------


def test_unknown_model_raises_model_not_found_naming_model_and_backend() -> None:
    with running_fake_ollama() as fake, pytest.raises(ModelNotFound) as caught:
        with_backend(fake.url, lambda b: collect(b, model="gemma3:27b"))
    assert "gemma3:27b" in str(caught.value)
    assert "pi-ollama" in str(caught.value)


def test_server_error_raises_protocol_error_with_status_and_body_message() -> None:
    with running_fake_ollama(fail_status=500) as fake:
        fake.state.fail_message = "llama runner process has terminated: signal: killed"
        with pytest.raises(BackendProtocolError) as caught:
            with_backend(fake.url, collect)
    assert "HTTP 500" in str(caught.value)
    assert "llama runner process has terminated: signal: killed" in str(caught.value)


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


def test_connection_dropped_mid_stream_raises_unavailable() -> None:
    with running_fake_ollama(drop_after=2) as fake:
        received, error = with_backend(fake.url, collect_until_error)
        assert fake.state.dropped_streams == 1
    assert [c.text for c in received] == ["The", " sky"]
    assert isinstance(error, BackendUnavailable)
    assert "dropped" in str(error)


def test_error_line_mid_stream_raises_protocol_error_with_its_message() -> None:
    with running_fake_ollama(error_after=1) as fake:
        received, error = with_backend(fake.url, collect_until_error)
    assert [c.text for c in received] == ["The"]
    assert isinstance(error, BackendProtocolError)
    assert "llama runner process has terminated: exit status 2" in str(error)


def test_slow_first_token_raises_backend_timeout() -> None:
    with running_fake_ollama(first_token_delay=1.0) as fake:
        with pytest.raises(BackendTimeout):
            with_backend(fake.url, collect, timeout=httpx.Timeout(0.2))
        # The timed-out request closed its stream; the fake saw the client leave.
        assert fake.wait_until(lambda s: s.aborted_streams == 1)


# --- cancellation --------------------------------------------------------------------------


def test_cancelling_the_consumer_closes_the_stream_on_the_server() -> None:
    async def scenario(backend: OllamaBackend) -> list[Chunk]:
        received: list[Chunk] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for chunk in backend.stream_chat("llama3.2:1b", HELLO, NO_OPTIONS):
                received.append(chunk)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # cancellation propagates: the adapter does not swallow it
        return received

    with running_fake_ollama(token_delay=0.2) as fake:
        received = with_backend(fake.url, scenario)
        assert fake.wait_until(lambda s: s.aborted_streams == 1)
        assert fake.state.streams_completed == 0
    assert [c.text for c in received] == ["The"]


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


def test_a_line_that_is_not_json_raises_protocol_error() -> None:
    body = b'{"message":{"role":"assistant","content":"ok"},"done":false}\n<html>oops</html>\n'
    received, error = mock_backend(body, collect_until_error)
    assert [c.text for c in received] == ["ok"]
    assert isinstance(error, BackendProtocolError)
    assert "<html>oops</html>" in str(error)


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
