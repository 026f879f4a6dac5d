from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.settings import load_yaml_config
from worker.config import (
    AnthropicSpec,
    CloudSpec,
    api_key_for,
    backend_names,
    backend_spec,
    build_worker_config,
    providers_with_keys,
    require_keys,
)


def test_flags_override_the_yaml_section() -> None:
    yaml_section = {
        "name": "gpu1",
        "tags": ["code"],
        "backends": [{"kind": "ollama", "url": "http://127.0.0.1:11434", "capacity": 4}],
    }
    config = build_worker_config(yaml_section, name="pi2", tags=frozenset({"pi"}))
    assert config.name == "pi2"
    assert config.tags == {"pi"}
    assert config.capacity == 4


def test_several_backends_get_distinct_names() -> None:
    config = build_worker_config(
        None,
        name="n",
        backends=(
            backend_spec(kind="ollama", url="http://a:11434"),
            backend_spec(kind="openai", url="http://a:8080"),
            backend_spec(kind="openai", url="http://a:8081"),
        ),
    )
    assert backend_names(config.backends) == ["ollama", "openai", "openai2"]


def test_no_backend_says_which_flags_to_give() -> None:
    with pytest.raises(ConfigError, match="--ollama URL, --openai-compat URL, --simulate, a"):
        build_worker_config(None, name="n")


def test_a_cloud_worker_needs_no_backend_and_advertises_the_providers_it_has_keys_for() -> None:
    config = build_worker_config({"cloud": True}, name="edge")
    assert config.cloud and config.backends == () and config.capacity == 4
    env = {"ANTHROPIC_API_KEY": "sk-a", "GOOGLE_API_KEY": "g", "MISTRAL_API_KEY": ""}
    assert providers_with_keys(env) == {"anthropic", "google"}
    require_keys(config, env)  # one key is enough
    with pytest.raises(ConfigError, match=r"--cloud .* ANTHROPIC_API_KEY"):
        require_keys(config, {"MISTRAL_API_KEY": ""})
    both = build_worker_config(
        None, name="n", cloud=True, backends=(backend_spec(kind="ollama", url="http://a:1"),)
    )
    assert both.capacity == 1 + 4


def test_bad_url_is_explained_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        backend_spec(kind="openai", url="ftp://user:s3cret@host")
    assert "must start with http:// or https://" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_api_key_never_shows_in_repr() -> None:
    spec = backend_spec(kind="openai", url="http://host:8000", api_key="sk-live-123")
    assert "sk-live-123" not in repr(spec)
    assert spec.api_key is not None and spec.api_key.get_secret_value() == "sk-live-123"


# --- one spec per kind ---------------------------------------------------------------------


def test_one_kinds_settings_are_refused_on_another() -> None:
    with pytest.raises(ConfigError, match="first_token_s"):
        backend_spec(kind="ollama", url="http://a:11434", first_token_s=0.1)
    with pytest.raises(ConfigError, match="url"):
        backend_spec(kind="ollama")  # a local server needs its URL; a provider does not
    assert backend_spec(kind="anthropic").kind == "anthropic"


def test_an_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="invalid worker configuration") as caught:
        build_worker_config({"backends": [{"kind": "bedrock"}]}, name="n")
    assert "bedrock" in str(caught.value) or "kind" in str(caught.value)


def test_a_provider_from_the_yaml_keeps_its_own_fields() -> None:
    config = build_worker_config(
        {
            "backends": [
                {
                    "kind": "anthropic",
                    "url": "http://127.0.0.1:9/",
                    "api_key": "sk-ant-from-yaml",
                    "max_tokens": 512,
                    "models": ["claude-test"],
                }
            ]
        },
        name="n",
    )
    (spec,) = config.backends
    assert isinstance(spec, AnthropicSpec)
    assert (spec.url, spec.max_tokens, spec.models) == ("http://127.0.0.1:9", 512, ("claude-test",))
    assert "sk-ant-from-yaml" not in repr(config)


# --- API keys ------------------------------------------------------------------------------


def test_the_key_comes_from_the_providers_variable() -> None:
    spec = backend_spec(kind="mistral")
    assert isinstance(spec, CloudSpec)
    key, source = api_key_for(spec, "mistral", "mistral", {"MISTRAL_API_KEY": "mk-1"})
    assert (key.get_secret_value(), source) == ("mk-1", "MISTRAL_API_KEY")


def test_gemini_falls_back_to_google_api_key() -> None:
    spec = backend_spec(kind="google")
    assert isinstance(spec, CloudSpec)
    key, source = api_key_for(spec, "google", "google", {"GOOGLE_API_KEY": "g-2"})
    assert (key.get_secret_value(), source) == ("g-2", "GOOGLE_API_KEY")
    both = {"GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"}
    assert api_key_for(spec, "google", "google", both)[1] == "GEMINI_API_KEY"


def test_a_key_in_the_yaml_wins_and_is_named_without_its_value() -> None:
    spec = backend_spec(kind="anthropic", api_key="sk-ant-yaml")
    assert isinstance(spec, CloudSpec)
    key, source = api_key_for(spec, "anthropic", "claude", {"ANTHROPIC_API_KEY": "other"})
    assert key.get_secret_value() == "sk-ant-yaml"
    assert "sk-ant-yaml" not in source and "claude" in source


def test_a_missing_key_names_the_variables_to_set() -> None:
    spec = backend_spec(kind="google")
    assert isinstance(spec, CloudSpec)
    with pytest.raises(ConfigError, match="set GEMINI_API_KEY or GOOGLE_API_KEY"):
        api_key_for(spec, "google", "google", {})


def test_a_key_written_as_a_variable_in_corral_yaml_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_CLAUDE_KEY", "sk-ant-from-env-var")
    path = tmp_path / "corral.yaml"
    path.write_text(
        "worker:\n  backends:\n    - kind: anthropic\n      api_key: ${MY_CLAUDE_KEY}\n"
    )
    config = build_worker_config(load_yaml_config(path)["worker"], name="n")
    (spec,) = config.backends
    assert isinstance(spec, CloudSpec)
    key, source = api_key_for(spec, "anthropic", "anthropic", {})
    assert key.get_secret_value() == "sk-ant-from-env-var"
    assert "sk-ant-from-env-var" not in repr(config) + source
