"""The Ollama-compatible API, driven by the official ``ollama`` client as its users drive it,
through the gateway process, onto real simulated workers on a real Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import ollama
import pytest

from broker.schemas import ChatMessage
from tests.controller.gateway.conftest import Gateway
from worker.backends.simulated import reply_for


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture
def client(gateway: Gateway) -> Iterator[ollama.Client]:
    with ollama.Client(host=gateway.url) as c:
        yield c


def test_a_streamed_chat_ends_with_ollamas_final_object(
    gateway: Gateway, client: ollama.Client
) -> None:
    prompt = "why is the sky blue"
    parts = list(
        client.chat(model="sim-small", messages=[{"role": "user", "content": prompt}], stream=True)
    )
    assert "".join(p.message.content or "" for p in parts) == expected(prompt)
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert final.done_reason == "stop"
    assert final.eval_count is not None and final.eval_count > 0
    assert final.prompt_eval_count is not None
    assert final.total_duration is not None and final.total_duration > 0
    assert final.model == "sim-small"


def test_generate_whole_and_name_latest_is_the_same_model(
    gateway: Gateway, client: ollama.Client
) -> None:
    answer = client.generate(model="sim-small:latest", prompt="hello there")
    assert answer.response == expected("hello there")
    assert answer.done and answer.done_reason == "stop"
    assert answer.eval_count is not None and answer.eval_count > 0
    chat = client.chat(model="sim-small", messages=[{"role": "user", "content": "hi"}])
    assert chat.message.content == expected("hi")


def test_tags_show_ps_and_version(gateway: Gateway, client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert {"sim-small", "sim-large"} <= names
    assert "sim-embed" not in names  # not installed on these workers
    shown = client.show("sim-large:latest")
    assert shown.modelinfo is not None
    assert shown.modelinfo["simllama.context_length"] == 131072
    assert "completion" in (shown.capabilities or [])
    assert "tools" in (shown.capabilities or [])  # the gateway passes tools on now
    assert client.show("sim-small").modelinfo["simllama.context_length"] == 8192  # type: ignore[index]
    running = {m.model for m in client.ps().models}
    assert "sim-small" in running  # the simulated backend starts with its first model loaded
    version = httpx.get(gateway.url + "/api/version", timeout=5).json()["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert httpx.head(gateway.url + "/", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/", timeout=5).text == "Ollama is running"


def test_errors_in_ollamas_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="sim-embed", input="hello")
    assert caught.value.status_code == 404  # no node here has it (test_embeddings.py: one has)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="sim-small", messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413


def test_keep_alive_zero_unloads_the_model_from_its_node(
    gateway: Gateway, client: ollama.Client
) -> None:
    client.chat(model="sim-large@beta", messages=[{"role": "user", "content": "load it"}])
    _wait_running(client, lambda running: "sim-large" in running)
    answer = client.generate(model="sim-large", keep_alive=0)
    assert answer.done_reason == "unload"
    _wait_running(client, lambda running: "sim-large" not in running)


def _wait_running(client: ollama.Client, predicate: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate({m.model for m in client.ps().models}):  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"/api/ps never changed as expected: {client.ps().models}")
