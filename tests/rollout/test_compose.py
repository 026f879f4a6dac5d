"""docker-compose.yml as podman-compose renders it (no container engine runs here): what users
rely on. No default password (compose refuses to start without one), Redis and Flower published
on loopback unless asked, healthchecks, Flower waiting for a healthy Redis, named volumes, a
worker whose stop drains; and the Redis service's own command, run here with the real
redis-server, demands the password and keeps an append-only file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from controller.localcluster import free_port, stop_process
from tests.support.servers import REPO_ROOT, wait_until

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SECRETS = {"REDIS_PASSWORD": "compose-test-password-0123", "FLOWER_AUTH": "watcher:flower-pw-0123"}
DRAIN_AT_LEAST_S = 600 + 30  # job_timeout_s plus Celery's margin on its hard time limit


def podman_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "podman-compose"
    if not binary.exists():
        pytest.fail("podman-compose is not installed: pip install -e '.[test]'")
    # Only what the test gives: no REDIS_PASSWORD from the caller's shell or a local .env.
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), **env}
    return subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), "--env-file", os.devnull, *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rendered(*profiles: str, **env: str) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    run = podman_compose(*flags, "--dry-run", "config", env={**SECRETS, **env})
    assert run.returncode == 0, run.stdout + run.stderr
    config: dict[str, Any] = yaml.safe_load(run.stdout)
    return config


def host_ips(service: dict[str, Any]) -> list[str]:
    return [str(port).rsplit(":", 2)[0] for port in service.get("ports", [])]


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "FLOWER_AUTH"])
def test_compose_refuses_to_start_without_a_secret(missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    run = podman_compose("--dry-run", "config", env=env)
    assert run.returncode != 0
    assert f"set {missing}" in run.stderr


def test_the_default_services_publish_on_loopback_only_and_have_healthchecks() -> None:
    services = rendered()["services"]
    assert set(services) == {"redis", "flower"}  # the worker, Ollama and CLI are opt-in
    assert host_ips(services["redis"]) == ["127.0.0.1"]
    assert host_ips(services["flower"]) == ["127.0.0.1"]
    for name in ("redis", "flower"):
        assert services[name]["healthcheck"]["test"], name
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["flower"]["environment"]["CORRAL_FLOWER_AUTH"] == SECRETS["FLOWER_AUTH"]
    assert services["flower"]["command"][0] == "flower"


def test_redis_is_published_beyond_loopback_only_when_asked() -> None:
    services = rendered(REDIS_PUBLISH="0.0.0.0")["services"]
    assert host_ips(services["redis"]) == ["0.0.0.0"]
    assert host_ips(services["flower"]) == ["127.0.0.1"]


def test_profiles_add_a_worker_that_drains_and_an_ollama_on_named_volumes() -> None:
    config = rendered("worker", "ollama")
    services = config["services"]
    worker = services["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) > DRAIN_AT_LEAST_S
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--ollama" in worker["command"]
    assert services["ollama"]["environment"]["OLLAMA_NUM_PARALLEL"] == "1"
    assert {"redis-data", "ollama-models"} <= set(config["volumes"])
    assert "redis-data:/data" in services["redis"]["volumes"]


def test_the_redis_services_command_starts_redis_with_the_password_and_aof(
    tmp_path: Path,
) -> None:
    """The service's own shell command and healthcheck, run against the installed
    redis-server (paths and port moved into a temporary folder)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    service = rendered()["services"]["redis"]
    assert service["command"][:2] == ["sh", "-c"]
    port = free_port()
    script = service["command"][2].replace("/tmp/auth.conf", str(tmp_path / "auth.conf"))
    script = script.rstrip() + f" --port {port} --dir {tmp_path} --bind 127.0.0.1\n"
    password = service["environment"]["REDISCLI_AUTH"]
    assert password == SECRETS["REDIS_PASSWORD"]
    process = subprocess.Popen(
        ["sh", "-c", script],
        env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": password},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=password)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_until(answers, 10, "redis-server started by the compose command")
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_text().replace("\0", " ")
        assert "redis-server" in cmdline and password not in cmdline
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        anonymous = redis.Redis(port=port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        # The healthcheck, as the container runs it (redis-cli reads REDISCLI_AUTH).
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        if shutil.which("redis-cli"):
            check = subprocess.run(
                ["sh", "-c", health[1].replace("redis-cli", f"redis-cli -p {port}")],
                env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": password},
                timeout=10,
            )
            assert check.returncode == 0
    finally:
        client.close()
        stop_process(process)


def test_the_sentinel_profile_adds_a_replica_and_three_sentinels_on_loopback() -> None:
    services = rendered("sentinel")["services"]
    sentinels = [services[f"sentinel-{i}"] for i in (1, 2, 3)]
    assert {host_ips(s)[0] for s in sentinels} == {"127.0.0.1"}
    assert len({s["ports"][0] for s in sentinels}) == 3  # three distinct host ports
    for sentinel in sentinels:
        script = sentinel["command"][-1]
        assert "--sentinel" in script and "sentinel monitor corral redis 6379 2" in script
        assert SECRETS["REDIS_PASSWORD"] not in script  # read from the environment at start
    replica = services["redis-replica"]
    assert "replicaof redis 6379" in replica["command"][-1]
    assert "redis-replica-data" in str(replica["volumes"])
    assert "sentinel-1" not in rendered()["services"]  # only with the profile
