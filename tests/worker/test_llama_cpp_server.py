"""OpenAICompatBackend against a real ``llama_cpp.server`` running a tiny random-weights model.

The fakes prove the adapter follows the documented format; this proves a real server agrees
(including that it tolerates ``stream_options``, which it does not implement). The model is
written by the test itself (tests/fakes/tiny_gguf.py): nothing can be downloaded here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from broker.schemas import (
    ChatMessage,
    GenerationOptions,
    ModelInfo,
    ToolCall,
    ToolDefinition,
    ToolFunction,
)
from tests.support.servers import free_port
from worker.backends.base import Chunk
from worker.backends.openai_compat import OpenAICompatBackend

pytestmark = pytest.mark.llama

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[llama])")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install .[llama])")

MODEL_ALIAS = "tiny-llama"
STARTUP_TIMEOUT_S = 60.0
HELLO = (ChatMessage(role="user", content="Hello there, llama."),)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``/v1/models`` until the server answers, it dies, or the deadline passes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{tail}")
            try:
                if client.get(f"{url}/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
    raise TimeoutError(f"llama_cpp.server not ready after {STARTUP_TIMEOUT_S}s")


@contextmanager
def running_llama_server(model: Path, alias: str, *extra: str) -> Iterator[str]:
    """``python -m llama_cpp.server`` for ``model`` on a free loopback port, logging next to
    the model; its URL once it answers. Stopped by its pid at the end."""
    port = free_port()
    log = model.with_suffix(".log")
    command = [
        *(sys.executable, "-m", "llama_cpp.server", "--model", str(model)),
        *("--model_alias", alias, "--host", "127.0.0.1", "--port", str(port)),
        *("--n_ctx", "512", "--verbose", "False", *extra),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama_cpp.server for the whole module (it takes seconds to start)."""
    # Imported here, after the importorskip above: the module needs gguf at import time.
    from tests.fakes.tiny_gguf import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf")
    with running_llama_server(model, MODEL_ALIAS) as url:
        yield url


async def _inventory(url: str) -> list[ModelInfo]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        return await OpenAICompatBackend("llama", f"{url}/v1", client).inventory()


async def _chat(url: str, options: GenerationOptions) -> list[Chunk]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        backend = OpenAICompatBackend("llama", url, client)
        return [chunk async for chunk in backend.stream_chat(MODEL_ALIAS, HELLO, options)]


def test_inventory_lists_the_served_model(llama_server: str) -> None:
    assert asyncio.run(_inventory(llama_server)) == [ModelInfo(name=MODEL_ALIAS, loaded=True)]


def test_stream_chat_streams_text_then_a_final_done_chunk(llama_server: str) -> None:
    chunks = asyncio.run(_chat(llama_server, GenerationOptions(seed=7, max_tokens=16)))
    *deltas, final = chunks
    assert any(chunk.text for chunk in deltas)
    assert not any(chunk.done for chunk in deltas)
    assert final.done
    assert final.text == ""
    assert final.finish_reason in {"stop", "length"}
    # llama_cpp.server sends no usage, so the adapter counts the content deltas itself.
    assert final.completion_tokens == len([c for c in deltas if c.text])


def test_max_tokens_is_respected(llama_server: str) -> None:
    chunks = asyncio.run(_chat(llama_server, GenerationOptions(seed=7, max_tokens=3)))
    final = chunks[-1]
    assert final.done
    assert final.finish_reason == "length"
    assert final.completion_tokens is not None
    assert 1 <= final.completion_tokens <= 3


def test_a_real_server_takes_a_tool_conversation_in_the_shape_the_adapter_sends(
    llama_server: str,
) -> None:
    """Tools, an assistant's call (its arguments a JSON string) and the tool's result (with its
    ``tool_call_id``) are accepted by a real server: the answer streams to its end. (The random
    model's words are no call; parsing streamed calls is covered against the fake.)"""
    tool = ToolDefinition(
        function=ToolFunction(
            name="get_weather",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        )
    )
    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo"})
    messages = (
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content='{"sky": "clear"}', tool_call_id="call_1"),
    )

    async def chat() -> list[Chunk]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            backend = OpenAICompatBackend("llama", llama_server, client)
            options = GenerationOptions(seed=7, max_tokens=4)
            stream = backend.stream_chat(MODEL_ALIAS, messages, options, tools=(tool,))
            return [chunk async for chunk in stream]

    final = asyncio.run(chat())[-1]
    assert final.done
    assert final.finish_reason in {"stop", "length", "tool_calls"}
