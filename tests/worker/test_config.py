from __future__ import annotations

import pytest

from broker.errors import ConfigError
from worker.config import backend_names, backend_spec, build_worker_config


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
    with pytest.raises(ConfigError, match="--ollama URL, --openai-compat URL or --simulate"):
        build_worker_config(None, name="n")


def test_bad_url_is_explained_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        backend_spec(kind="openai", url="ftp://user:s3cret@host")
    assert "must start with http:// or https://" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_api_key_never_shows_in_repr() -> None:
    spec = backend_spec(kind="openai", url="http://host:8000", api_key="sk-live-123")
    assert "sk-live-123" not in repr(spec)
    assert spec.api_key is not None and spec.api_key.get_secret_value() == "sk-live-123"
