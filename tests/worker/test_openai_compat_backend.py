"""OpenAICompatBackend against a fake OpenAI-style SSE server on loopback (and httpx's
MockTransport for the byte-level variants real servers send).

What every adapter does (stream order and usage, options, unknown model, HTTP errors,
refused and dropped connections, errors mid-stream, bad JSON, cancel) is checked once for all
in tests/worker/backends/test_contract.py; this file keeps what is particular to this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import (
    BackendError,
    BackendProtocolError,
    ModelNotFound,
)
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from tests.fakes.fake_openai import running_fake_openai
from worker.backends.base import Chunk, model_manager
from worker.backends.openai_compat import OpenAICompatBackend, api_root

T = TypeVar("T")
HELLO = (ChatMessage(role="user", content="Say something short"),)
NO_OPTIONS = GenerationOptions()
API_KEY = "sk-test-0123456789abcdef"


def with_backend(
    base_url: str,
    scenario: Callable[[OpenAICompatBackend], Awaitable[T]],
    *,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> T:
    """Run ``scenario`` on a fresh event loop with a backend on a client that is closed after."""

    async def main() -> T:
        async with httpx.AsyncClient(transport=transport) as client:
            key = SecretStr(api_key) if api_key is not None else None
            backend = OpenAICompatBackend("gpu-box", base_url, client, capacity=4, api_key=key)
            return await scenario(backend)

    return asyncio.run(main())


async def collect(
    backend: OpenAICompatBackend, model: str = "tiny-model", options: GenerationOptions = NO_OPTIONS
) -> list[Chunk]:
    return [chunk async for chunk in backend.stream_chat(model, HELLO, options)]


async def collect_until_error(backend: OpenAICompatBackend) -> tuple[list[Chunk], BackendError]:
    received: list[Chunk] = []
    try:
        async for chunk in backend.stream_chat("tiny-model", HELLO, NO_OPTIONS):
            received.append(chunk)
    except BackendError as exc:
        return received, exc
    raise AssertionError(f"the stream ended without an error after {received}")


# --- identity and URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    ["http://gpu:8080", "http://gpu:8080/", "http://gpu:8080/v1", "http://gpu:8080/v1/"],
)
def test_base_url_with_or_without_v1_reaches_the_same_api(base_url: str) -> None:
    assert api_root(base_url) == "http://gpu:8080/v1"


def test_identity() -> None:
    async def scenario(backend: OpenAICompatBackend) -> tuple[str, str, int]:
        return backend.url, backend.kind, backend.capacity

    assert with_backend("http://u:p4ssword@gpu:8080/v1", scenario) == (
        "http://gpu:8080",
        "openai",
        4,
    )


# --- inventory -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_inventory_lists_served_models_as_loaded(suffix: str) -> None:
    with running_fake_openai(models=["tiny-model", "other"]) as fake:
        inventory = with_backend(fake.url + suffix, lambda b: b.inventory())
    assert inventory == [
        ModelInfo(name="tiny-model", loaded=True),
        ModelInfo(name="other", loaded=True),
    ]


def slots_scenario(props: httpx.Response, *, capacity: int | None) -> tuple[int, int, list[str]]:
    """Capacity before and after two inventories against a server answering /props so; and
    the paths the backend asked for."""
    paths: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "qwen"}]})
        return props

    async def main() -> tuple[int, int]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(respond)) as client:
            backend = OpenAICompatBackend(
                "gpu-box", "http://gpu:8080/v1", client, capacity=capacity
            )
            before = backend.capacity
            await backend.inventory()
            await backend.inventory()
            return before, backend.capacity

    before, after = asyncio.run(main())
    return before, after, paths


def test_llama_cpp_slots_become_the_capacity_when_none_is_configured() -> None:
    props = httpx.Response(200, json={"total_slots": 4, "chat_template": "..."})
    before, after, paths = slots_scenario(props, capacity=None)
    assert (before, after) == (1, 4)
    assert paths.count("/props") == 1  # asked once, at the server's root, not under /v1


def test_a_configured_capacity_wins_and_props_is_not_asked() -> None:
    props = httpx.Response(200, json={"total_slots": 4})
    assert slots_scenario(props, capacity=2) == (2, 2, ["/v1/models", "/v1/models"])


def test_a_server_without_props_counts_as_one_slot_and_is_asked_once() -> None:
    before, after, paths = slots_scenario(httpx.Response(404, text="Not Found"), capacity=None)
    assert (before, after, paths.count("/props")) == (1, 1, 1)


# --- the model lifecycle is not theirs -----------------------------------------------------


def test_openai_backends_do_not_manage_models() -> None:
    """No pull/warm/unload/rm stubs: the adapter is simply no ModelManager."""
    backend = OpenAICompatBackend("gpu-box", "http://gpu:8080", httpx.AsyncClient())
    assert model_manager(backend) is None
    assert not hasattr(backend, "pull")


# --- streaming -----------------------------------------------------------------------------


def test_without_usage_from_the_server_completion_tokens_are_counted() -> None:
    # llama_cpp.server ignores stream_options.include_usage and sends no usage at all.
    with running_fake_openai(reply="one two three", supports_usage=False) as fake:
        chunks = with_backend(fake.url, collect)
    assert chunks[-1] == Chunk(
        text="", done=True, finish_reason="stop", prompt_tokens=None, completion_tokens=3
    )


# --- the API key ---------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_token() -> None:
    with running_fake_openai(api_key=API_KEY) as fake:
        inventory = with_backend(fake.url, lambda b: b.inventory(), api_key=API_KEY)
        chunks = with_backend(fake.url, collect, api_key=API_KEY)
        assert fake.state.authorizations == [f"Bearer {API_KEY}"] * 2
    assert [m.name for m in inventory] == ["tiny-model"]
    assert chunks[-1].done


def test_no_authorization_header_without_a_key() -> None:
    with running_fake_openai() as fake:
        with_backend(fake.url, collect)
        assert fake.state.authorizations == [None]


# --- wire variants (MockTransport) ---------------------------------------------------------


def mock_stream(body: bytes) -> httpx.MockTransport:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(respond)


def test_comments_crlf_and_split_data_lines_are_understood() -> None:
    body = (
        b": keep-alive\r\n\r\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,\r\n'
        b'data: "delta":{"content":" there"},"finish_reason":null}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    chunks = with_backend("http://llama.test:8080", collect, transport=mock_stream(body))
    assert [c.text for c in chunks] == ["Hi", " there", ""]
    assert chunks[-1] == Chunk(text="", done=True, finish_reason="stop", completion_tokens=2)


def test_llama_cpp_error_field_mid_stream_raises_protocol_error() -> None:
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
        b'error: {"code":500,"message":"context shift is disabled","type":"server_error"}\n\n'
    )
    received, error = with_backend(
        "http://llama.test:8080", collect_until_error, transport=mock_stream(body)
    )
    assert [c.text for c in received] == ["Hi"]
    assert isinstance(error, BackendProtocolError)
    assert "context shift is disabled" in str(error)


def test_a_stream_cut_before_any_finish_raises_protocol_error() -> None:
    body = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    received, error = with_backend(
        "http://llama.test:8080", collect_until_error, transport=mock_stream(body)
    )
    assert [c.text for c in received] == ["Hi"]
    assert isinstance(error, BackendProtocolError)


def test_vllm_style_404_body_is_model_not_found() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        body = {"object": "error", "message": "The model `x` does not exist.", "code": 404}
        return httpx.Response(404, json=body)

    with pytest.raises(ModelNotFound):
        with_backend("http://vllm.test:8000", collect, transport=httpx.MockTransport(respond))


def test_fastapi_detail_body_is_quoted() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(BackendProtocolError, match="HTTP 404: Not Found"):
        with_backend("http://llama.test:8000", collect, transport=httpx.MockTransport(respond))
