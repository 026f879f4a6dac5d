"""Each backend's ``embed``: one request per batch, one vector per input in order, errors in
corral's tree. Ollama and OpenAI-compatible servers are the protocol-faithful fakes (a real
llama.cpp server is in tests/controller/gateway/test_embeddings_llama.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import BackendUnavailable, ModelNotFound
from broker.schemas import ModelInfo
from tests.fakes.fake_ollama import FakeModel, running_fake_ollama
from tests.fakes.fake_openai import fake_embedding, running_fake_openai
from worker.backends.base import Embeddings, embedder
from worker.backends.ollama import OllamaBackend
from worker.backends.openai_compat import OpenAICompatBackend
from worker.backends.simulated import SimulatedBackend

T = TypeVar("T")


def run(scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with httpx.AsyncClient(timeout=10) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_ollama_posts_the_batch_to_api_embed() -> None:
    with running_fake_ollama([FakeModel.embedding("nomic-embed-text"), "llama3.2:1b"]) as fake:
        answer = run(
            lambda c: OllamaBackend("o", fake.url, c).embed("nomic-embed-text", ["a b", "c"])
        )
        assert fake.state.last_body("/api/embed") == {
            "model": "nomic-embed-text",
            "input": ["a b", "c"],
        }
    assert len(answer.vectors) == 2
    assert answer.vectors[0] != answer.vectors[1]
    assert answer.prompt_tokens == 3  # the fake counts words


def test_ollama_unknown_model_and_a_server_that_is_down() -> None:
    with running_fake_ollama(["llama3.2:1b"]) as fake:
        with pytest.raises(ModelNotFound, match="no-such"):
            run(lambda c: OllamaBackend("o", fake.url, c).embed("no-such", ["a"]))
        url = fake.url
    with pytest.raises(BackendUnavailable):
        run(lambda c: OllamaBackend("o", url, c).embed("nomic-embed-text", ["a"]))


def test_openai_compatible_posts_the_batch_and_orders_by_index() -> None:
    with running_fake_openai(models=["embedder"], embeddings_reversed=True) as fake:
        answer = run(
            lambda c: OpenAICompatBackend("l", fake.url, c, capacity=1).embed(
                "embedder", ["first text", "second"]
            )
        )
        assert fake.state.embedding_bodies == [
            {"model": "embedder", "input": ["first text", "second"]}
        ]
    assert answer == Embeddings([fake_embedding("first text"), fake_embedding("second")], 3)


def test_openai_compatible_unknown_model_is_model_not_found_and_keys_stay_secret() -> None:
    with running_fake_openai(models=["embedder"], api_key="sk-secret-123") as fake:
        with pytest.raises(ModelNotFound) as caught:
            run(
                lambda c: OpenAICompatBackend(
                    "l", fake.url, c, capacity=1, api_key=SecretStr("sk-secret-123")
                ).embed("nope", ["a"])
            )
        assert fake.state.authorizations[-1] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in str(caught.value)


def test_configured_embedding_models_say_so_in_the_inventory() -> None:
    with running_fake_openai(models=["chatty", "embedder"]) as fake:
        models = run(
            lambda c: OpenAICompatBackend(
                "l", fake.url, c, capacity=1, embed_models=("embedder",)
            ).inventory()
        )
    assert models == [
        ModelInfo(name="chatty", loaded=True),
        ModelInfo(name="embedder", loaded=True, capabilities=frozenset({"embed"})),
    ]


def test_simulated_vectors_are_deterministic_unit_vectors() -> None:
    backend = SimulatedBackend("sim", first_token_s=0, models=("sim-small", "sim-embed"))
    assert embedder(backend) is backend

    async def twice() -> tuple[Embeddings, Embeddings]:
        return (
            await backend.embed("sim-embed", ["hello", "world"]),
            await backend.embed("sim-embed", ["hello"]),
        )

    first, again = asyncio.run(twice())
    assert first.vectors[0] == again.vectors[0] != first.vectors[1]
    assert abs(sum(x * x for x in first.vectors[0]) - 1) < 1e-9
    assert first.prompt_tokens == 2
    with pytest.raises(ModelNotFound):
        asyncio.run(backend.embed("sim-huge", ["x"]))
