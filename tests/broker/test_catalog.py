"""The capability and price tables: shipped rows, globs, and corral.yaml's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import catalog as catalog_module
from broker.catalog import build_catalog, catalog_for, provider_of, shipped_catalog
from broker.errors import ConfigError
from broker.schemas import ModelInfo, Usage
from broker.settings import build_settings


def test_a_cloud_family_is_found_by_its_glob() -> None:
    caps = shipped_catalog().capabilities("anthropic", "claude-sonnet-4-5-20250929")
    assert caps is not None
    assert (caps.context, caps.max_output) == (200_000, 64_000)
    assert caps.vision and caps.tools and caps.thinking and caps.json_output


def test_the_first_matching_glob_wins_so_mini_is_not_read_as_its_big_sibling() -> None:
    catalog = shipped_catalog()
    mini, big = (
        catalog.price("openai-cloud", "gpt-4o-mini"),
        catalog.price("openai-cloud", "gpt-4o"),
    )
    assert mini is not None and big is not None
    assert mini.input < big.input


def test_the_backend_kind_picks_the_provider() -> None:
    assert provider_of("openai-cloud") == "openai"
    assert provider_of("google") == "gemini"
    assert provider_of("ollama") == provider_of("openai") == provider_of("simulated") == "local"
    # deepseek-chat is a cloud model on a deepseek backend, nothing on a local one.
    assert shipped_catalog().capabilities("deepseek", "deepseek-chat") is not None
    assert shipped_catalog().capabilities("ollama", "deepseek-chat") is None


def test_a_local_model_matches_with_its_ollama_tag_and_is_not_priced() -> None:
    catalog = shipped_catalog()
    caps = catalog.capabilities("ollama", "llama3.2:3b")
    assert caps is not None and caps.context == 131_072
    assert catalog.price("ollama", "llama3.2:3b") is None
    assert (
        catalog.cost("ollama", "llama3.2:3b", Usage(prompt_tokens=10, completion_tokens=10)) is None
    )


def test_every_claude_and_gemini_chat_model_can_take_tools_and_images() -> None:
    """Their adapters pass both on, so the router may send them such jobs; a Gemini family
    newer than the table still gets the catch-all row, and Gemma (no function calling) not."""
    catalog = shipped_catalog()
    for kind, model in (("anthropic", "claude-opus-5"), ("google", "models/gemini-3-pro")):
        caps = catalog.capabilities(kind, model)
        assert caps is not None and {"tools", "vision"} <= caps.capabilities()
    assert catalog.capabilities("google", "gemma-3-27b-it") is None


def test_an_unknown_model_has_no_row() -> None:
    assert shipped_catalog().capabilities("anthropic", "not-a-claude") is None


def test_cost_is_usd_per_million_tokens_in_and_out() -> None:
    cost = shipped_catalog().cost(
        "anthropic", "claude-sonnet-4-5", Usage(prompt_tokens=1_000_000, completion_tokens=100_000)
    )
    assert cost == pytest.approx(3.0 + 1.5)


def test_an_override_changes_only_the_fields_it_sets() -> None:
    catalog = build_catalog({"local": {"llama3.2*": {"context": 4096}}}, None)
    caps = catalog.capabilities("ollama", "llama3.2:1b")
    assert caps is not None
    assert caps.context == 4096
    assert caps.tools  # still the shipped row's


def test_an_override_adds_a_family_and_a_price() -> None:
    catalog = build_catalog(
        {"local": {"my-finetune*": {"context": 16384, "vision": True}}},
        {"local": {"my-finetune*": {"input": 0.5, "output": 1.0}}},
    )
    caps = catalog.capabilities("simulated", "my-finetune:q4")
    assert caps is not None and caps.context == 16384 and caps.vision
    assert catalog.cost(
        "simulated", "my-finetune:q4", Usage(prompt_tokens=2_000_000, completion_tokens=0)
    ) == pytest.approx(1.0)
    # A configured price is looked at before the shipped one.
    cheaper = build_catalog(None, {"anthropic": {"claude-sonnet-4*": {"input": 0, "output": 0}}})
    assert cheaper.cost("anthropic", "claude-sonnet-4-5", Usage(prompt_tokens=9)) == 0


@pytest.mark.parametrize(
    ("capabilities", "prices", "said"),
    [
        ({"nowhere": {"x*": {"context": 1}}}, None, "unknown provider 'nowhere'"),
        ({"local": {"x*": {"context": -1}}}, None, "capabilities"),
        ({"local": {"x*": {"contxt": 1}}}, None, "capabilities"),
        (None, {"openai": {"x*": {"input": "cheap", "output": 1}}}, "prices"),
    ],
)
def test_a_bad_override_is_a_config_error_naming_the_section(
    capabilities: object, prices: object, said: str
) -> None:
    with pytest.raises(ConfigError, match=said):
        build_catalog(capabilities, prices)


def test_fill_keeps_what_the_backend_said_and_fills_the_rest() -> None:
    catalog = shipped_catalog()
    listed = catalog.fill("anthropic", ModelInfo(name="claude-opus-4-1", loaded=True))
    assert listed.context_length == 200_000
    assert {"chat", "vision", "tools", "thinking"} <= listed.capabilities
    reported = ModelInfo(
        name="llama3.2:3b", context_length=8192, capabilities=frozenset({"chat", "tools"})
    )
    assert catalog.fill("ollama", reported) == reported
    embedder = ModelInfo(name="llama3.2-embed", capabilities=frozenset({"embed"}))
    assert catalog.fill("ollama", embedder).capabilities == {"embed"}


def test_corral_yaml_sections_reach_the_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "corral.yaml"
    config.write_text(
        "capabilities:\n  local:\n    tiny*: {context: 1024}\n"
        "prices:\n  local:\n    tiny*: {input: 1.0, output: 2.0}\n"
    )
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    settings = build_settings()
    catalog = catalog_for(settings.capabilities, settings.prices)
    caps = catalog.capabilities("ollama", "tiny:latest")
    assert caps is not None and caps.context == 1024
    assert catalog.price("ollama", "tiny:latest") is not None


def test_each_table_is_read_on_the_first_lookup_that_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An idle Ollama node keeps neither table in memory: its backend reports every fact.
    read: list[str] = []
    real_read = catalog_module._read_table

    def counting_read(name: str) -> object:
        read.append(name)
        return real_read(name)

    monkeypatch.setattr(catalog_module, "_read_table", counting_read)
    catalog_module._shipped_caps.cache_clear()
    catalog_module._shipped_prices.cache_clear()
    try:
        configured = build_catalog({"local": {"x*": {"context": 8}}}, None)  # checked, not read
        reported = ModelInfo(name="qwen3:8b", context_length=8192, capabilities=frozenset({"chat"}))
        assert shipped_catalog().fill("ollama", reported) == reported
        assert configured.fill("ollama", reported) == reported
        assert read == []
        assert shipped_catalog().price("ollama", "qwen3:8b") is None
        assert read == ["prices.json"]
        caps = configured.capabilities("ollama", "qwen3:8b")
        assert caps is not None and caps.thinking
        assert shipped_catalog().fill("ollama", ModelInfo(name="qwen3:8b")).context_length == 40960
        assert read == ["prices.json", "capabilities.json"]  # each once per process
    finally:
        catalog_module._shipped_caps.cache_clear()
        catalog_module._shipped_prices.cache_clear()
