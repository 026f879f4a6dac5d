"""A whole tool round trip with the official ``openai`` client through the gateway to a Claude
route and a Gemini route: the model calls a function, the client runs it and sends the result
back, the model answers. The gateway runs in its own process in front of a real worker on real
Redis, whose Anthropic and Gemini backends talk to fakes of those APIs that check the request
shapes as the providers do (a result must answer a call of the turn before, one per call)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.controller.gateway.conftest import Gateway, running_gateway, wait_for_models
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.fakes.fake_gemini import FakeGemini, running_fake_gemini
from tests.support.cli import corral
from tests.support.servers import start_worker

CLAUDE = "claude-sonnet-4-5"
GEMINI = "gemini-3-test-flash"
"""A Gemini 3 model: the fake refuses its replayed calls without a thought signature."""
ANTHROPIC_KEY = "sk-ant-gateway-tools-0000"
GEMINI_KEY = "AIza-gateway-tools-0000"
ARGUMENTS = {"city": "Paris", "days": 2}
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeGemini]]:
    with (
        running_fake_anthropic(
            api_key=ANTHROPIC_KEY, models=[CLAUDE], reply="Sunny in Paris.", tool_input=ARGUMENTS
        ) as claude,
        running_fake_gemini(
            api_key=GEMINI_KEY, models=[GEMINI], reply="Sunny in Paris.", call_args=ARGUMENTS
        ) as gemini,
    ):
        yield claude, gemini


@pytest.fixture(scope="module")
def gateway(
    module_broker_url: str, module_log_dir: Path, fakes: tuple[FakeAnthropic, FakeGemini]
) -> Iterator[Gateway]:
    claude, gemini = fakes
    config = module_log_dir / "cloud-tools.yaml"
    config.write_text(
        "worker:\n  backends:\n"
        f"    - kind: anthropic\n      name: claude\n      url: {claude.url}\n"
        f"    - kind: google\n      name: gemini\n      url: {gemini.url}\n"
    )
    worker = start_worker(
        module_broker_url,
        "cloudy",
        log_dir=module_log_dir,
        env={
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "GEMINI_API_KEY": GEMINI_KEY,
            "CORRAL_CONFIG": str(config),
        },
    )
    try:
        for name, url, model in (
            ("claude", claude.url.replace("http://", "anthropic+http://"), CLAUDE),
            ("gem", gemini.url.replace("http://", "gemini+http://"), GEMINI),
        ):
            added = corral(module_broker_url, "route", "add", name, url, model)
            assert added.returncode == 0, added.stderr
        with running_gateway(module_broker_url, module_log_dir) as gw:
            wait_for_models(gw, {CLAUDE, GEMINI})
            yield gw
    finally:
        worker.stop()


@pytest.mark.parametrize("route", ["@claude", "@gem"])
def test_a_tool_round_trip_through_a_cloud_route(
    gateway: Gateway, fakes: tuple[FakeAnthropic, FakeGemini], route: str
) -> None:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as client:
        question: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        stream = client.chat.completions.create(
            model=route,
            messages=question,
            tools=[WEATHER_TOOL],
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
                        arguments[call.index] = (
                            arguments.get(call.index, "") + call.function.arguments
                        )
                finish = choice.finish_reason or finish
        assert finish == "tool_calls"
        assert names == {0: "get_weather"}
        assert json.loads(arguments[0]) == ARGUMENTS
        assert ids[0]

        # The client ran the function: its result goes back, linked to the call by its id.
        answer = client.chat.completions.create(
            model=route,
            messages=[
                *question,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": ids[0],
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": arguments[0]},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": ids[0], "content": '{"sky": "sunny"}'},
            ],
            tools=[WEATHER_TOOL],
        )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "Sunny in Paris."
    assert not answer.choices[0].message.tool_calls
    # The result reached the provider in its own shape, answering the call it made.
    claude, gemini = fakes
    if route == "@claude":
        (result,) = claude.state.chat_bodies[-1]["messages"][-1]["content"]
        assert result == {
            "type": "tool_result",
            "tool_use_id": "toolu_01Fake",
            "content": '{"sky": "sunny"}',
        }
    else:
        (result,) = gemini.state.chat_bodies[-1]["contents"][-1]["parts"]
        assert result == {"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}}}


def test_an_image_reaches_claude_as_a_base64_block_typed_by_its_bytes(
    gateway: Gateway, fakes: tuple[FakeAnthropic, FakeGemini]
) -> None:
    claude, _ = fakes
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="@claude",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        # Sent as a GIF's data: URL: the adapter reads the type off the bytes.
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/gif;base64,{PNG_B64}"},
                        },
                    ],
                }
            ],
        )
    assert answer.choices[0].message.content == "Sunny in Paris."
    assert claude.state.chat_bodies[-1]["messages"][-1]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {"type": "text", "text": "What is this?"},
    ]
