"""The OpenAI-compatible API, driven by the official ``openai`` client as its users drive it,
through the gateway process, onto real simulated workers on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from broker.schemas import ChatMessage
from tests.controller.gateway.conftest import Gateway
from worker.backends.simulated import reply_for


def expected(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as c:
        yield c


def test_a_streamed_answer_arrives_in_chunks_then_a_finish_then_usage(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    prompt = "why is the sky blue"
    chunks = list(
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(prompt)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens > 0
    assert {c.model for c in chunks} == {"sim-small"}
    assert len({c.id for c in chunks}) == 1


def test_a_whole_answer_says_which_node_and_job_served_it(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim-small@beta",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        ],
    )
    completion = raw.parse()
    assert raw.headers["x-corral-node"] == "beta"
    assert raw.headers["x-corral-tier"] == "local"  # a simulated backend is a local route
    assert len(raw.headers["x-corral-job"]) >= 8
    answer = completion.choices[0].message
    assert answer.role == "assistant" and answer.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_routing_hints_by_header_and_by_at_node(client: openai.OpenAI) -> None:
    for model, headers, node in (
        ("@alpha", {}, "alpha"),
        ("sim-small", {"X-Corral-Node": "beta"}, "beta"),
        ("sim-small", {"X-Corral-Tags": "gpu"}, "alpha"),
    ):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
        assert raw.headers["x-corral-node"] == node, (model, headers)


def test_the_model_list_has_every_model_and_its_nodes_with_or_without_v1(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    for base in (gateway.v1, gateway.url):
        models = client.with_options(base_url=base).models.list().data
        by_id = {m.id: m for m in models}
        assert {"sim-small", "sim-large"} <= set(by_id)
        extension = by_id["sim-small"].model_extra or {}
        assert sorted(extension["corral"]["nodes"]) == ["alpha", "beta"]
    assert client.models.retrieve("sim-large:latest").id == "sim-large"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_an_unknown_model_is_a_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.message
    assert caught.value.code == "model_not_found"


def test_bad_requests_are_400s_that_say_what_is_wrong(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError, match="invalid tools"):
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "retrieval", "function": {"name": "f"}}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "wizard", "content": "hi"}],  # type: ignore[misc,list-item]
        )
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_object"},
        )
    with pytest.raises(openai.BadRequestError, match="X-Corral-Priority"):
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Corral-Priority": "urgent"},
        )
    answer = httpx.post(gateway.v1 + "/chat/completions", content=b"{not json", timeout=5)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "the request body is not valid JSON"
    assert "Traceback" not in answer.text


def test_a_prompt_over_the_cluster_limit_is_a_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert caught.value.status_code == 413
    assert "over the limit" in caught.value.message


def test_a_session_keeps_its_node(client: openai.OpenAI) -> None:
    def ask(model: str, session: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "and then?"}],
            extra_headers={"X-Corral-Session": session},
        )
        return raw.headers["x-corral-node"]

    assert ask("sim-small@beta", "gw-session-1") == "beta"
    assert ask("sim-small@alpha", "gw-session-2") == "alpha"
    for _ in range(2):
        assert ask("sim-small", "gw-session-1") == "beta"
        assert ask("sim-small", "gw-session-2") == "alpha"


def test_the_legacy_completions_endpoint(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="sim-small", prompt="hello there")
    assert whole.choices[0].text == expected("hello there")
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    streamed = list(client.completions.create(model="sim-small", prompt="hello", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected("hello")
    assert streamed[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle"):
        client.completions.create(model="sim-small", prompt="def f(", suffix="return 1")
