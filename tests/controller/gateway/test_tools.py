"""Tool calls, images and reasoning text through the cluster, as the official clients see them.

The official ``openai`` and ``ollama`` clients talk to the gateway (its own process) in front of
real workers on real Redis; the workers front a fake Ollama and a fake llama.cpp server (the
OpenAI-compatible fake), which speak each provider's documented wire format. So each test
crosses the conversion twice: client API -> corral's messages -> the other API on the backend.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.controller.gateway.conftest import Gateway, running_gateway, wait_for_models
from tests.fakes.fake_ollama import FakeModel, FakeOllama, running_fake_ollama
from tests.fakes.fake_openai import FakeOpenAI, running_fake_openai
from tests.support.servers import WorkerProcess, running_workers

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ARGUMENTS = {"city": "Paris", "days": 2, "units": {"temperature": "celsius"}}
# The smallest PNG there is: the magic number is what the OpenAI side's data: URL is typed by.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PNG_B64 = base64.b64encode(PNG).decode()
THOUGHTS = "The user wants a colour. Blue is the usual answer."


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[FakeOllama]:
    models = [
        FakeModel("toolbox:latest", capabilities=("completion", "tools", "thinking")),
        FakeModel.vision("eyes:latest"),
        FakeModel("plain:latest", capabilities=("completion",)),
    ]
    with running_fake_ollama(models, reply="Sunny and mild.") as fake:
        yield fake


@pytest.fixture(scope="module")
def fake_llama_cpp() -> Iterator[FakeOpenAI]:
    with running_fake_openai(models=["lcpp-tools"], reply="It will rain.") as fake:
        yield fake


@pytest.fixture(scope="module")
def workers(
    module_broker_url: str,
    module_log_dir: Path,
    fake_ollama: FakeOllama,
    fake_llama_cpp: FakeOpenAI,
) -> Iterator[list[WorkerProcess]]:
    # llama.cpp does not report what a model can do: its node says so with tags.
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("ollama-node", ["--ollama", fake_ollama.url]),
        ("lcpp-node", ["--openai-compat", fake_llama_cpp.url, "--tags", "tools,vision"]),
    ) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    module_broker_url: str, module_log_dir: Path, workers: list[WorkerProcess]
) -> Iterator[Gateway]:
    with running_gateway(module_broker_url, module_log_dir) as gw:
        wait_for_models(gw, {"toolbox:latest", "eyes:latest", "plain:latest", "lcpp-tools"})
        yield gw


@pytest.fixture
def oai(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def oll(gateway: Gateway) -> Iterator[ollama.Client]:
    with ollama.Client(host=gateway.url) as client:
        yield client


@pytest.fixture(autouse=True)
def _fresh_fakes(fake_ollama: FakeOllama, fake_llama_cpp: FakeOpenAI) -> None:
    fake_ollama.state.tool_calls = []
    fake_ollama.state.thinking = ""
    fake_ollama.state.requests.clear()
    fake_llama_cpp.state.tool_calls = []
    fake_llama_cpp.state.reasoning = ""
    fake_llama_cpp.state.bodies.clear()


def test_openai_client_streams_a_tool_call_that_ollama_made(
    oai: openai.OpenAI, fake_ollama: FakeOllama
) -> None:
    fake_ollama.state.tool_calls = [
        {"function": {"name": "get_weather", "arguments": ARGUMENTS}},
    ]
    stream = oai.chat.completions.create(
        model="toolbox",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.id:
                    ids[call.index] = call.id
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                if call.function and call.function.arguments:
                    arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert names == {0: "get_weather"}
    assert json.loads(arguments[0]) == ARGUMENTS
    assert ids[0]  # Ollama gives none; the adapter makes one so a result can name its call
    sent = fake_ollama.state.last_body("/api/chat")
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["parameters"] == WEATHER_TOOL["function"]["parameters"]


def test_ollama_client_gets_a_streamed_llama_cpp_tool_call_as_an_object(
    oll: ollama.Client, fake_llama_cpp: FakeOpenAI
) -> None:
    fake_llama_cpp.state.tool_calls = [
        {"id": "call_9", "name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
    ]
    chunks = list(
        oll.chat(
            model="lcpp-tools",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            stream=True,
        )
    )
    final = chunks[-1]
    assert final.done
    calls = final.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", ARGUMENTS)
    ]
    assert not any(c.message.tool_calls for c in chunks[:-1])  # the final chunk carries them
    sent = fake_llama_cpp.state.bodies[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"


def test_openai_client_gets_a_whole_tool_call_when_not_streaming(
    oai: openai.OpenAI, fake_llama_cpp: FakeOpenAI
) -> None:
    fake_llama_cpp.state.tool_calls = [
        {"id": "call_7", "name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
    ]
    answer = oai.chat.completions.create(
        model="lcpp-tools",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.id == "call_7"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == ARGUMENTS  # type: ignore[union-attr]


def test_a_tool_result_goes_back_to_ollama_linked_to_its_call(
    oai: openai.OpenAI, fake_ollama: FakeOllama
) -> None:
    answer = oai.chat.completions.create(
        model="toolbox",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert answer.choices[0].message.content == "Sunny and mild."
    assert answer.choices[0].finish_reason == "stop"
    sent = fake_ollama.state.last_body("/api/chat")["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": ARGUMENTS}}]
    # Ollama names a result by its function: the gateway found it from the call's id.
    assert sent[2] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_name": "get_weather"}


def test_a_tool_result_goes_back_to_llama_cpp_with_a_call_id(
    oll: ollama.Client, fake_llama_cpp: FakeOpenAI
) -> None:
    answer = oll.chat(
        model="lcpp-tools",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": ARGUMENTS}}],
            },
            {"role": "tool", "content": '{"sky": "grey"}', "tool_name": "get_weather"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert answer.message.content == "It will rain."
    sent = fake_llama_cpp.state.bodies[-1]["messages"]
    call = sent[1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGUMENTS  # a JSON string on this side
    assert sent[2]["role"] == "tool" and sent[2]["tool_call_id"] == call["id"]


def test_an_image_reaches_ollama_as_base64(oai: openai.OpenAI, fake_ollama: FakeOllama) -> None:
    answer = oai.chat.completions.create(
        model="eyes",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                ],
            }
        ],
    )
    assert answer.choices[0].message.content == "Sunny and mild."
    sent = fake_ollama.state.last_body("/api/chat")["messages"][0]
    assert sent["content"] == "What is this?"
    assert sent["images"] == [PNG_B64]
    assert base64.b64decode(sent["images"][0]) == PNG


def test_an_image_reaches_llama_cpp_as_a_data_url(
    oll: ollama.Client, fake_llama_cpp: FakeOpenAI
) -> None:
    oll.chat(
        model="lcpp-tools",
        messages=[{"role": "user", "content": "What is this?", "images": [PNG]}],
    )
    parts = fake_llama_cpp.state.bodies[-1]["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parts[1]["type"] == "image_url"
    assert parts[1]["image_url"]["url"] == f"data:image/png;base64,{PNG_B64}"


def test_ollama_thinking_stays_apart_from_the_answer(
    oll: ollama.Client, oai: openai.OpenAI, fake_ollama: FakeOllama
) -> None:
    fake_ollama.state.thinking = THOUGHTS
    chunks = list(
        oll.chat(
            model="toolbox",
            messages=[{"role": "user", "content": "Pick a colour."}],
            think=True,
            stream=True,
        )
    )
    thinking = "".join(c.message.thinking or "" for c in chunks)
    content = "".join(c.message.content or "" for c in chunks)
    assert thinking == THOUGHTS
    assert content == "Sunny and mild."
    assert fake_ollama.state.last_body("/api/chat")["think"] is True

    # Asked through the OpenAI side (reasoning_effort), it arrives as reasoning_content.
    answer = oai.chat.completions.create(
        model="toolbox",
        messages=[{"role": "user", "content": "Pick a colour."}],
        reasoning_effort="low",
    )
    message = answer.choices[0].message
    assert message.content == "Sunny and mild."
    assert (message.model_extra or {}).get("reasoning_content") == THOUGHTS
    assert fake_ollama.state.last_body("/api/chat")["think"] is True


def test_llama_cpp_reasoning_content_stays_apart_from_the_answer(
    oai: openai.OpenAI, oll: ollama.Client, fake_llama_cpp: FakeOpenAI
) -> None:
    fake_llama_cpp.state.reasoning = THOUGHTS
    reasoning, content = [], []
    for chunk in oai.chat.completions.create(
        model="lcpp-tools", messages=[{"role": "user", "content": "Rain?"}], stream=True
    ):
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == THOUGHTS
    assert "".join(content) == "It will rain."

    answer = oll.chat(model="lcpp-tools", messages=[{"role": "user", "content": "Rain?"}])
    assert answer.message.thinking == THOUGHTS
    assert answer.message.content == "It will rain."


def test_tools_or_images_for_a_model_without_the_capability_are_a_400(
    oai: openai.OpenAI, oll: ollama.Client, fake_ollama: FakeOllama
) -> None:
    with pytest.raises(openai.BadRequestError, match="tools capability") as caught:
        oai.chat.completions.create(
            model="plain",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    assert caught.value.code == "capability_missing"
    with pytest.raises(ollama.ResponseError, match="vision capability") as refused:
        oll.chat(
            model="toolbox",
            messages=[{"role": "user", "content": "What is this?", "images": [PNG]}],
        )
    assert refused.value.status_code == 400
    assert fake_ollama.state.requests_to("/api/chat") == []  # nothing reached a backend
    # A model nobody has stays a 404, tools or not: the capability is not what is missing.
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="no-such-model",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )


def test_ollama_generate_passes_images_on(oll: ollama.Client, fake_ollama: FakeOllama) -> None:
    answer = oll.generate(model="eyes", prompt="What is this?", images=[PNG])
    assert answer.response == "Sunny and mild."
    sent = fake_ollama.state.last_body("/api/chat")["messages"]
    assert sent == [{"role": "user", "content": "What is this?", "images": [PNG_B64]}]


def test_a_call_whose_arguments_are_not_a_json_object_is_a_400(
    oai: openai.OpenAI, fake_ollama: FakeOllama
) -> None:
    for arguments in ("{not json", "[1, 2]"):
        with pytest.raises(openai.BadRequestError, match="JSON string holding an object"):
            oai.chat.completions.create(
                model="toolbox",
                messages=[
                    {"role": "user", "content": "Weather?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": arguments},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
                ],
                tools=[WEATHER_TOOL],  # type: ignore[list-item]
            )
    assert fake_ollama.state.requests_to("/api/chat") == []
