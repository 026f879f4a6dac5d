"""Every backend kind has an adapter, and a worker's flags build the right specs."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import httpx
import pytest
from click.testing import CliRunner

from broker.errors import ConfigError
from broker.schemas import BackendKind
from worker.__main__ import worker_command
from worker.backends.registry import FACTORIES, build_backends
from worker.config import backend_spec, build_worker_config


def test_every_kind_has_a_factory() -> None:
    assert set(FACTORIES) == set(get_args(BackendKind))


@pytest.mark.parametrize("kind", ["anthropic", "google", "openai-cloud", "mistral", "deepseek"])
def test_a_provider_without_its_key_stops_the_worker_naming_the_variable(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in (
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "OPENAI_API_KEY",
        "MISTRAL_API_KEY",
        "DEEPSEEK_API_KEY",
    ):
        monkeypatch.delenv(variable, raising=False)
    config = build_worker_config(None, name="n", backends=(backend_spec(kind=kind),))
    with pytest.raises(ConfigError, match="API_KEY"):
        build_backends(config, httpx.AsyncClient())


def test_provider_backends_are_built_with_their_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "ds-test")
    config = build_worker_config(
        None,
        name="n",
        backends=(backend_spec(kind="anthropic"), backend_spec(kind="deepseek")),
    )
    backends = build_backends(config, httpx.AsyncClient())
    assert {name: b.kind for name, b in backends.items()} == {
        "anthropic": "anthropic",
        "deepseek": "deepseek",
    }
    assert backends["anthropic"].url == "https://api.anthropic.com"
    assert backends["deepseek"].url == "https://api.deepseek.com"


def test_a_missing_key_is_a_clear_cli_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no corral.yaml here
    result = CliRunner().invoke(
        worker_command, ["--name", "n", "--anthropic", "--broker", "redis://127.0.0.1:9/0"]
    )
    assert result.exit_code == 2
    assert "set ANTHROPIC_API_KEY" in result.output
    assert "Traceback" not in result.output
