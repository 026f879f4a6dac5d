from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.settings import build_settings, redacted_url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CORRAL_BROKER_URL", "CORRAL_CONFIG", "CORRAL_HEARTBEAT_INTERVAL_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_default_broker_is_local_redis() -> None:
    assert build_settings().broker_url.get_secret_value() == "redis://127.0.0.1:6379/0"


def test_precedence_env_then_yaml_then_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CORRAL_BROKER_URL", "redis://env-host:6379/0")
    monkeypatch.setenv("CORRAL_HEARTBEAT_INTERVAL_S", "7")
    assert build_settings().broker_url.get_secret_value() == "redis://env-host:6379/0"
    (tmp_path / "corral.yaml").write_text("broker_url: redis://yaml-host:6379/0\n")
    settings = build_settings()
    assert settings.broker_url.get_secret_value() == "redis://yaml-host:6379/0"
    assert settings.heartbeat_interval_s == 7  # the env still fills what YAML leaves out
    flagged = build_settings(broker_url="redis://flag-host:6379/0")
    assert flagged.broker_url.get_secret_value() == "redis://flag-host:6379/0"


def test_yaml_reads_secrets_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "hunter2")
    (tmp_path / "corral.yaml").write_text("broker_url: redis://:${REDIS_PASSWORD}@nas:6379/0\n")
    settings = build_settings()
    assert settings.broker_url.get_secret_value() == "redis://:hunter2@nas:6379/0"
    assert "hunter2" not in repr(settings)


def test_missing_secret_variable_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text("broker_url: redis://:${NOT_SET_ANYWHERE}@nas:6379/0\n")
    with pytest.raises(ConfigError, match=r"\$\{NOT_SET_ANYWHERE\}, which is not set"):
        build_settings()


def test_bad_broker_url_error_does_not_echo_it() -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(broker_url="http://user:hunter2@host")
    assert "redis://" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_config_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_settings()


def test_redacted_url_hides_credentials() -> None:
    assert redacted_url("redis://:pw@host:6379/0") == "redis://***@host:6379/0"
    assert redacted_url("redis://host:6379/0") == "redis://host:6379/0"


def test_model_aliases_from_yaml_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "corral.yaml").write_text(
        "aliases:\n  coder: [qwen2.5-coder:32b, qwen2.5-coder:7b]\n"
    )
    assert build_settings().aliases == {"coder": ("qwen2.5-coder:32b", "qwen2.5-coder:7b")}
    (tmp_path / "corral.yaml").unlink()
    monkeypatch.setenv("CORRAL_ALIASES", '{"chat": ["llama3.2:3b"]}')
    assert build_settings().aliases == {"chat": ("llama3.2:3b",)}


def test_failover_settings_refuse_nonsense() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        build_settings(max_attempts=0)
    with pytest.raises(ConfigError, match="breaker_cooldown_s"):
        build_settings(breaker_cooldown_s=-1)
