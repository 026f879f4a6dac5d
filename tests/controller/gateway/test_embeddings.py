"""Embeddings through the gateway, driven by the official ``openai`` and ``ollama`` clients,
onto real workers on a real Redis: a simulated node with an embedding model, a chat-only
node, and a node fronting the fake Ollama with an embedding model."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from broker.settings import build_settings
from controller.client import CorralClient
from tests.controller.gateway.conftest import Gateway, running_gateway, wait_for_models
from tests.fakes.fake_ollama import FakeModel, _embedding, running_fake_ollama
from tests.support.servers import WorkerProcess, running_workers, wait_until
from worker.backends.simulated import simulated_embedding

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
SLOW = ["--simulate", "--sim-first-token-ms", "30000", "--sim-models", "sim-embed"]


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[str]:
    with running_fake_ollama([FakeModel.embedding("nomic-embed-text"), "llama3.2:1b"]) as fake:
        yield fake.url


@pytest.fixture(scope="module")
def workers(
    module_broker_url: str, module_log_dir: Path, fake_ollama: str
) -> Iterator[list[WorkerProcess]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("embedder", [*FAST, "--sim-models", "sim-small,sim-embed"]),
        ("chatter", FAST),
        ("olla", ["--ollama", fake_ollama]),
    ) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    module_broker_url: str, module_log_dir: Path, workers: list[WorkerProcess]
) -> Iterator[Gateway]:
    with running_gateway(module_broker_url, module_log_dir) as gw:
        wait_for_models(gw, {"sim-small", "sim-embed", "nomic-embed-text:latest"})
        yield gw


@pytest.fixture
def oai(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def olm(gateway: Gateway) -> Iterator[ollama.Client]:
    with ollama.Client(host=gateway.url, timeout=30) as c:
        yield c


def unpack(packed: str) -> list[float]:
    raw = base64.b64decode(packed)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def close(a: list[float], b: list[float]) -> bool:
    """Equal as float32 (base64 carries float32s)."""
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


def test_openai_client_gets_one_vector_per_input_in_order(oai: openai.OpenAI) -> None:
    texts = ["the sky is blue", "grass is green", "the sky is blue"]
    for encoding in ("float", "base64"):
        raw = oai.embeddings.with_raw_response.create(
            model="sim-embed", input=texts, encoding_format=encoding
        )
        answer = raw.parse()
        assert raw.headers["x-corral-node"] == "embedder"
        assert raw.headers["x-corral-job"]
        assert [d.index for d in answer.data] == [0, 1, 2]
        for text, item in zip(texts, answer.data, strict=True):
            # Asked for base64, the client hands over OpenAI's packed float32s as sent.
            vector = item.embedding if encoding == "float" else unpack(str(item.embedding))
            assert close(vector, simulated_embedding(text))
        assert answer.model == "sim-embed"
        assert answer.usage.prompt_tokens == 4 + 3 + 4  # the simulated backend counts words
        assert answer.usage.total_tokens == 11
    default = oai.embeddings.create(model="sim-embed", input="one text")
    [only] = default.data
    assert close(only.embedding, simulated_embedding("one text"))


def test_the_ollama_node_embeds_through_api_embed(olm: ollama.Client, oai: openai.OpenAI) -> None:
    answer = olm.embed(model="nomic-embed-text", input=["a", "b"])
    assert answer.embeddings == [_embedding("a"), _embedding("b")]
    assert answer.model == "nomic-embed-text:latest"
    assert answer.prompt_eval_count == 2
    single = olm.embed(model="nomic-embed-text:latest", input="just one")
    assert single.embeddings == [_embedding("just one")]
    via_openai = oai.embeddings.create(
        model="nomic-embed-text", input=["a"], encoding_format="float"
    )
    assert via_openai.data[0].embedding == _embedding("a")


def test_the_legacy_api_embeddings_takes_one_prompt(olm: ollama.Client) -> None:
    answer = olm.embeddings(model="sim-embed", prompt="hello there")
    assert close(list(answer.embedding), simulated_embedding("hello there"))


def test_a_chat_only_node_never_gets_an_embed_job(gateway: Gateway, module_broker_url: str) -> None:
    nodes = set()
    for i in range(8):
        answer = httpx.post(
            gateway.v1 + "/embeddings",
            json={"model": "sim-embed", "input": [f"text {i}"]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        nodes.add(answer.headers["x-corral-node"])
    assert nodes == {"embedder"}
    # Any embedding model will do when the job names none: never one of chatter's.
    settings = build_settings(broker_url=module_broker_url)
    with CorralClient(settings) as client:
        for _ in range(4):
            result = client.embed(["anything"])
            assert result.node in ("embedder", "olla")
            assert result.model in ("sim-embed", "nomic-embed-text:latest")


def test_unknown_and_chat_models_are_404s_in_each_apis_shape(
    oai: openai.OpenAI, olm: ollama.Client
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.embeddings.create(model="no-such-model", input="hi")
    assert "no-such-model" in missing.value.message
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as chat_model:
        oai.embeddings.create(model="sim-small", input="hi")
    assert "not an embedding model" in chat_model.value.message
    with pytest.raises(ollama.ResponseError) as caught:
        olm.embed(model="no-such-model", input="hi")
    assert caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as chat_to_embedder:
        oai.chat.completions.create(model="sim-embed", messages=[{"role": "user", "content": "hi"}])
    assert "embedding model: it cannot chat" in chat_to_embedder.value.message


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "sim-embed", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "sim-embed", "input": [[1, 2, 3]]}, "token arrays"),
        ({"model": "sim-embed", "input": "x", "dimensions": 8}, "dimensions"),
        ({"model": "sim-embed", "input": []}, "at least one text"),
        ({"model": "sim-embed"}, "'input' is required"),
        ({"input": "x"}, "'model' is required"),
    ],
)
def test_bad_openai_requests_are_400s(gateway: Gateway, body: dict[str, object], says: str) -> None:
    answer = httpx.post(gateway.v1 + "/embeddings", json=body, timeout=10)
    assert answer.status_code == 400
    assert says in answer.json()["error"]["message"]


def test_embedding_models_are_listed_with_their_capability(
    gateway: Gateway, olm: ollama.Client
) -> None:
    listed = {m.model for m in olm.list().models}
    assert {"sim-embed", "nomic-embed-text:latest", "sim-small"} <= listed
    assert olm.show("sim-embed").capabilities == ["embedding"]


def metric(gateway: Gateway, line_start: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def test_embed_jobs_are_counted_and_a_client_that_leaves_cancels_its_job(
    gateway: Gateway, module_broker_url: str, module_log_dir: Path
) -> None:
    httpx.post(gateway.v1 + "/embeddings", json={"model": "sim-embed", "input": "x"}, timeout=30)
    ok = 'corral_gateway_jobs_total{api="openai",model="sim-embed",node="embedder",outcome="ok"}'
    assert metric(gateway, ok) >= 1
    gone = 'corral_gateway_refused_requests_total{api="openai",status="499"}'
    before = metric(gateway, gone)
    settings = build_settings(broker_url=module_broker_url)
    with (
        running_workers(module_broker_url, module_log_dir, ("slowemb", SLOW)),
        CorralClient(settings) as client,
    ):

        def slow_node(busy: bool) -> bool:
            found = [n for n in client.nodes() if n.name == "slowemb" and n.up]
            return bool(found) and (found[0].info.in_flight > 0) == busy

        wait_until(lambda: slow_node(busy=False), 15, "the slow node up")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gateway.v1 + "/embeddings",
                json={"model": "sim-embed@slowemb", "input": "take thirty seconds"},
                timeout=3,
            )
        # The node's 30 s request is dropped when the client hangs up, not when it ends.
        wait_until(lambda: slow_node(busy=False), 15, "the slow node to drop the job")
    wait_until(lambda: metric(gateway, gone) == before + 1, 10, "the 499 to be counted")
    assert metric(gateway, "corral_gateway_in_flight_streams ") == 0
