"""Hot reload of corral.yaml: ``ConfigWatch`` swaps valid edits in whole and refuses the rest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from broker.settings import CorralSettings
from controller.config_watch import ConfigWatch


def write(path: Path, text: str) -> None:
    """Write and move the mtime on, as an editor's save does (even within one clock tick)."""
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "corral.yaml"
    write(path, "aliases:\n  coder: [qwen2.5-coder:7b]\nmax_attempts: 2\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(path))
    monkeypatch.delenv("CORRAL_ALIASES", raising=False)
    return path


def test_a_valid_edit_replaces_the_settings_whole(config_file: Path) -> None:
    watch = ConfigWatch.from_environment()
    before = watch.current()
    seen: list[tuple[CorralSettings, CorralSettings]] = []
    watch.subscribe(lambda old, new: seen.append((old, new)))
    assert watch.poll() is False  # nothing changed yet

    write(config_file, "aliases:\n  coder: [a]\n  chat: [b, c]\nmax_attempts: 4\n")
    assert watch.poll() is True
    after = watch.current()
    assert after.aliases == {"coder": ("a",), "chat": ("b", "c")}
    assert after.max_attempts == 4
    assert before.aliases == {"coder": ("qwen2.5-coder:7b",)}  # the old object is untouched
    assert seen == [(before, after)]
    assert watch.problem is None and watch.reloaded_at is not None


def test_an_invalid_edit_is_refused_and_the_last_good_config_stays(
    config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch = ConfigWatch.from_environment()
    good = watch.current()
    write(config_file, "aliases: [unclosed\n")
    with caplog.at_level(logging.ERROR, logger="corral.config"):
        assert watch.poll() is False
    assert watch.current() is good
    assert watch.problem is not None and "not valid YAML" in watch.problem
    assert "refused" in caplog.text and "not valid YAML" in caplog.text

    write(config_file, "max_attempts: 99\n")  # valid YAML, refused by the settings model
    assert watch.poll() is False
    assert watch.current() is good
    assert "max_attempts" in (watch.problem or "")

    config_file.unlink()
    assert watch.poll() is False
    assert watch.current() is good
    assert "gone" in (watch.problem or "")

    write(config_file, "aliases:\n  coder: [fixed]\n")
    assert watch.poll() is True
    assert watch.current().aliases == {"coder": ("fixed",)}
    assert watch.problem is None


def test_settings_fixed_at_start_wait_for_a_restart(
    config_file: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_PW", "hunter2-secret")
    watch = ConfigWatch.from_environment()
    url = watch.current().broker_url
    write(
        config_file,
        "broker_url: redis://:${SECRET_PW}@elsewhere:6379/0\naliases:\n  coder: [b]\n",
    )
    with caplog.at_level(logging.WARNING, logger="corral.config"):
        assert watch.poll() is True
    assert watch.current().broker_url == url  # the connections in use were made with it
    assert watch.current().aliases == {"coder": ("b",)}
    assert "broker_url changed" in caplog.text and "restart" in caplog.text
    assert "hunter2-secret" not in caplog.text


def test_command_line_flags_keep_winning_over_the_file(config_file: Path) -> None:
    watch = ConfigWatch.from_environment(max_attempts=5)
    write(config_file, "max_attempts: 1\naliases:\n  x: [y]\n")
    assert watch.poll() is True
    assert watch.current().max_attempts == 5
    assert watch.current().aliases == {"x": ("y",)}
