"""Editing corral.yaml under a running gateway: a new alias serves the next request; a broken
edit is refused with the reason on /health and in the log, and the old config keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.controller.gateway.conftest import Gateway, running_gateway, wait_for_models
from tests.support.servers import WorkerProcess, wait_until


def save(path: Path, text: str) -> None:
    """Write as an editor saves: a new file renamed over the old one."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)


def ask(gateway: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=30)


def test_an_alias_added_to_corral_yaml_serves_the_next_request(
    module_broker_url: str, tmp_path: Path, sim_workers: list[WorkerProcess]
) -> None:
    config = tmp_path / "corral.yaml"
    save(config, "aliases:\n  old-name: [sim-small]\n")
    env = {"CORRAL_CONFIG": str(config)}
    with running_gateway(module_broker_url, tmp_path, env=env) as gw:
        wait_for_models(gw, {"sim-small"})
        assert ask(gw, "old-name").status_code == 200
        assert ask(gw, "new-name").status_code == 404
        assert httpx.get(gw.url + "/health", timeout=5).json()["status"] == "ok"

        save(config, "aliases:\n  old-name: [sim-small]\n  new-name: [sim-large, sim-small]\n")
        wait_until(lambda: ask(gw, "new-name").status_code == 200, 15, "the new alias")
        answer = ask(gw, "new-name").json()
        assert answer["model"] in ("sim-large", "sim-small")
        assert answer["choices"][0]["message"]["content"]
        listed = {m["id"] for m in httpx.get(gw.v1 + "/models", timeout=5).json()["data"]}
        assert {"old-name", "new-name"} <= listed

        def problem() -> str:
            return httpx.get(gw.url + "/health", timeout=5).json()["config"]["problem"] or ""

        # Broken YAML: refused, the reason shown, the last good config keeps serving.
        save(config, "aliases:\n  old-name: [sim-small\n")
        wait_until(lambda: "not valid YAML" in problem(), 15, "the broken edit refused")
        health = httpx.get(gw.url + "/health", timeout=5).json()
        assert "not valid YAML" in health["config"]["problem"]
        assert health["config"]["path"] == str(config)
        assert ask(gw, "old-name").status_code == 200
        assert ask(gw, "new-name").status_code == 200
        assert "edit refused" in gw.log()

        # A value the settings model refuses is refused the same way.
        save(config, "aliases:\n  only: [sim-small]\nmax_attempts: 0\n")
        wait_until(lambda: "max_attempts" in problem(), 15, "the invalid value refused")
        assert ask(gw, "only").status_code == 404
        assert ask(gw, "new-name").status_code == 200

        # Fixed: taken, and /health is ok again.
        save(config, "aliases:\n  only: [sim-small]\n")
        wait_until(lambda: ask(gw, "only").status_code == 200, 15, "the fixed config")
        assert ask(gw, "new-name").status_code == 404
        assert httpx.get(gw.url + "/health", timeout=5).json()["status"] == "ok"
