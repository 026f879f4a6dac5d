"""``--effort`` on each family's wire, against the fakes (which refuse what the providers
refuse: a budget under 1024, thinking with a temperature, reasoning_effort on gpt-4o,
``minimal`` on an o-series model, a Pro budget of 0, ``think`` on a model without thinking)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.catalog import shipped_catalog
from broker.errors import BackendError
from broker.schemas import ChatMessage, Effort, GenerationOptions
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.fakes.fake_gemini import running_fake_gemini
from tests.fakes.fake_ollama import FakeModel, running_fake_ollama
from tests.fakes.fake_openai import running_fake_openai
from tests.worker.backends.contract import PLANTED_KEY, SETUPS, Setup, with_backend
from worker.backends.base import Backend
from worker.backends.effort import effort_ignored_note, reasoning_control

PROMPT = (ChatMessage(role="user", content="Think about this."),)


def setup(setup_id: str) -> Setup:
    return next(s for s in SETUPS if s.id == setup_id)


def answer(fake_setup: Setup, url: str, model: str, effort: Effort | None, **options: Any) -> str:
    async def scenario(backend: Backend) -> str:
        chosen = GenerationOptions(effort=effort, **options)
        return "".join([c.text async for c in backend.stream_chat(model, PROMPT, chosen)])

    return with_backend(fake_setup, url, scenario)


@pytest.mark.parametrize(
    ("model", "effort", "sent"),
    [
        ("o3-mini", "high", "high"),
        ("o3-mini", "minimal", "low"),  # the o-series knows no "minimal"
        ("gpt-5-mini", "minimal", "minimal"),
    ],
)
def test_openai_reasoning_models_get_reasoning_effort(
    model: str, effort: Effort, sent: str
) -> None:
    with running_fake_openai(api_key=PLANTED_KEY, models=[model]) as fake:
        assert answer(setup("openai-cloud"), fake.url, model, effort)
        assert fake.state.chat_bodies[-1]["reasoning_effort"] == sent


def test_openai_refuses_reasoning_effort_on_gpt_4o_which_is_why_the_runner_drops_it() -> None:
    with (
        running_fake_openai(api_key=PLANTED_KEY, models=["gpt-4o"]) as fake,
        pytest.raises(BackendError, match="reasoning_effort"),
    ):
        answer(setup("openai-cloud"), fake.url, "gpt-4o", "high")
    assert not reasoning_control("openai-cloud", "gpt-4o", shipped_catalog())
    assert reasoning_control("openai-cloud", "o3-mini", shipped_catalog())


def test_a_local_openai_compatible_server_never_gets_reasoning_effort() -> None:
    with running_fake_openai(api_key=PLANTED_KEY, models=["tiny-model"]) as fake:
        answer(setup("openai-compatible"), fake.url, "tiny-model", "high")
        assert "reasoning_effort" not in fake.state.chat_bodies[-1]
    assert not reasoning_control("openai", "qwen3:8b", shipped_catalog())


@pytest.mark.parametrize(("effort", "budget"), [("low", 1024), ("medium", 8192), ("high", 24576)])
def test_anthropic_gets_a_thinking_budget_above_which_the_answer_keeps_its_max_tokens(
    effort: Effort, budget: int
) -> None:
    model = "claude-sonnet-4-5"
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[model], reply="Four.") as fake:
        text = answer(setup("anthropic"), fake.url, model, effort, temperature=0.2, max_tokens=50)
        body = fake.state.chat_bodies[-1]
    assert text == "Four."  # the thinking block is not part of the answer
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert body["max_tokens"] == budget + 50
    assert "temperature" not in body  # thinking refuses one


def test_anthropic_minimal_effort_leaves_thinking_off_and_keeps_the_temperature() -> None:
    model = "claude-sonnet-4-5"
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[model]) as fake:
        answer(setup("anthropic"), fake.url, model, "minimal", temperature=0.2)
        body = fake.state.chat_bodies[-1]
    assert "thinking" not in body and body["temperature"] == 0.2


@pytest.mark.parametrize(
    ("model", "effort", "budget"),
    [
        ("gemini-2.5-flash", "minimal", 0),
        ("gemini-2.5-flash", "medium", 8192),
        ("gemini-2.5-pro", "minimal", 128),  # Pro cannot switch thinking off
        ("gemini-2.5-pro", "high", 24576),
    ],
)
def test_gemini_gets_a_thinking_budget(model: str, effort: Effort, budget: int) -> None:
    with running_fake_gemini(api_key=PLANTED_KEY, models=[model]) as fake:
        assert answer(setup("google"), fake.url, model, effort)
        config = fake.state.chat_bodies[-1]["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": budget}


@pytest.mark.parametrize(
    ("model", "effort", "think"),
    [("qwen3:8b", "high", True), ("qwen3:8b", "minimal", False), ("gpt-oss:20b", "low", "low")],
)
def test_ollama_gets_its_think_flag(model: str, effort: Effort, think: bool | str) -> None:
    thinker = FakeModel(model, capabilities=("completion", "tools", "thinking"))
    with running_fake_ollama([thinker]) as fake:
        assert answer(setup("ollama"), fake.url, model, effort)
        assert fake.state.last_body("/api/chat")["think"] == think


def test_ollama_refuses_think_for_a_model_without_thinking_and_the_table_agrees() -> None:
    with (
        running_fake_ollama(["llama3.2:1b"]) as fake,
        pytest.raises(BackendError, match="does not support thinking"),
    ):
        answer(setup("ollama"), fake.url, "llama3.2:1b", "high")
    assert not reasoning_control("ollama", "llama3.2:1b", shipped_catalog())
    assert reasoning_control("ollama", "qwen3:8b", shipped_catalog())


def test_without_effort_no_family_gets_a_reasoning_field() -> None:
    with running_fake_anthropic(api_key=PLANTED_KEY, models=["claude-sonnet-4-5"]) as fake:
        answer(setup("anthropic"), fake.url, "claude-sonnet-4-5", None)
        assert "thinking" not in fake.state.chat_bodies[-1]
    with running_fake_ollama(["llama3.2:1b"]) as ollama:
        answer(setup("ollama"), ollama.url, "llama3.2:1b", None)
        assert "think" not in ollama.state.last_body("/api/chat")


def test_the_note_names_the_model() -> None:
    assert effort_ignored_note("deepseek-chat") == (
        "effort ignored: deepseek-chat has no reasoning control"
    )
