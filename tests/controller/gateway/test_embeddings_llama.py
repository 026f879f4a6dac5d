"""Embeddings from a real ``llama_cpp.server`` started with embeddings on, through a worker
(``--openai-compat URL --openai-embed-model MODEL``), real Redis and the gateway, driven by the
official ``openai`` and ``ollama`` clients. The model is the tiny random-weights GGUF the test
writes, told to mean-pool so the server answers one vector per text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.controller.gateway.conftest import Gateway, running_gateway, wait_for_models
from tests.support.servers import running_workers
from tests.worker.test_llama_cpp_server import running_llama_server

pytestmark = pytest.mark.llama

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[llama])")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install .[llama])")

MODEL = "tiny-embed"
DIMENSIONS = 64  # the tiny model's width


@pytest.fixture(scope="module")
def llama_embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.fakes.tiny_gguf import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(
        tmp_path_factory.mktemp("llama-embed") / "tiny.gguf", mean_pooling=True
    )
    with running_llama_server(model, MODEL, "--embedding", "true") as url:
        yield url


@pytest.fixture(scope="module")
def gateway(module_broker_url: str, module_log_dir: Path, llama_embedder: str) -> Iterator[Gateway]:
    worker_args = ["--openai-compat", llama_embedder, "--openai-embed-model", MODEL]
    chat_only = ["--simulate", "--sim-first-token-ms", "5"]
    with (
        running_workers(
            module_broker_url,
            module_log_dir,
            ("llama", worker_args),
            ("chatter", chat_only),
        ) as _workers,
        running_gateway(module_broker_url, module_log_dir) as gw,
    ):
        wait_for_models(gw, {MODEL, "sim-small"})
        yield gw


def direct(url: str, texts: list[str]) -> list[list[float]]:
    answer = httpx.post(
        f"{url}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=60
    ).json()
    return [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]


def test_openai_client_gets_the_servers_vectors(gateway: Gateway, llama_embedder: str) -> None:
    texts = ["the sky is blue", "a home lab"]
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as client:
        raw = client.embeddings.with_raw_response.create(
            model=MODEL, input=texts, encoding_format="float"
        )
    answer = raw.parse()
    assert raw.headers["x-corral-node"] == "llama"
    assert [len(d.embedding) for d in answer.data] == [DIMENSIONS, DIMENSIONS]
    assert [d.embedding for d in answer.data] == direct(llama_embedder, texts)
    assert answer.data[0].embedding != answer.data[1].embedding
    assert answer.usage.prompt_tokens > 0


def test_ollama_client_and_unknown_models(gateway: Gateway, llama_embedder: str) -> None:
    with ollama.Client(host=gateway.url, timeout=60) as client:
        answer = client.embed(model=MODEL, input="a home lab")
        assert answer.embeddings == direct(llama_embedder, ["a home lab"])
        with pytest.raises(ollama.ResponseError) as missing:
            client.embed(model="no-such-model", input="x")
        assert missing.value.status_code == 404
