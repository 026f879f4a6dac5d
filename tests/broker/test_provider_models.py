"""Which provider a bare model name belongs to, and where its jobs go."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.provider_models import check_provider_urls, provider_scheme, provider_url
from broker.settings import build_settings
from controller.client import make_spec
from controller.dispatch import with_inferred_provider


@pytest.mark.parametrize(
    ("model", "scheme"),
    [
        ("gpt-4o-mini", "openai"),
        ("o3-mini", "openai"),
        ("o4-mini", "openai"),
        ("claude-sonnet-4-5", "anthropic"),
        ("gemini-2.5-flash", "gemini"),
        ("mistral-large-latest", "mistral"),
        ("codestral-latest", "mistral"),
        ("deepseek-chat", "deepseek"),
        ("deepseek-reasoner", "deepseek"),
        # Local models: open weights people run on Ollama or llama.cpp.
        ("orca-mini", None),
        ("deepseek-r1:7b", None),
        ("llama3.2:3b", None),
        ("qwen2.5-coder:7b", None),
        ("gpt-oss:20b", "openai"),  # named like OpenAI's: the fleet's own models come first
    ],
)
def test_a_bare_model_name_says_its_provider(model: str, scheme: str | None) -> None:
    assert provider_scheme(model) == scheme


def test_the_official_endpoint_unless_configured() -> None:
    assert provider_url("claude-x", {}) == "anthropic://"
    assert provider_url("claude-x", {"anthropic": "anthropic://proxy.lan"}) == (
        "anthropic://proxy.lan"
    )
    assert provider_url("llama3", {"anthropic": "anthropic://proxy.lan"}) is None


def test_provider_urls_are_checked() -> None:
    with pytest.raises(ConfigError, match="not a cloud provider"):
        check_provider_urls({"ollama": "ollama://pi"})
    with pytest.raises(ConfigError, match="needs a anthropic:// URL"):
        check_provider_urls({"anthropic": "openai://"})
    settings = build_settings(provider_urls={"gemini": "gemini+http://127.0.0.1:9"})
    assert settings.provider_urls == {"gemini": "gemini+http://127.0.0.1:9"}


def test_only_a_plain_job_for_a_provider_model_is_sent_to_the_provider() -> None:
    inferred = with_inferred_provider(make_spec("hi", model="claude-x"), {}, {})
    assert inferred is not None and inferred.route_url == "anthropic://"
    assert inferred.model == "claude-x"
    # An alias, a pinned node, a named route or a local-looking name keep their own way.
    assert (
        with_inferred_provider(make_spec("hi", model="claude-x"), {"claude-x": ["a"]}, {}) is None
    )
    assert with_inferred_provider(make_spec("hi", model="claude-x", node="pi"), {}, {}) is None
    assert with_inferred_provider(make_spec("hi", model="llama3"), {}, {}) is None
    assert with_inferred_provider(make_spec("hi"), {}, {}) is None
