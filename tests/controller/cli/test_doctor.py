"""``corral doctor`` as a user runs it, against real redis-servers (one set up as corral wants,
one with the wrong eviction policy and no AOF) and real worker processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker import __version__, names
from broker.acl import CONTROLLER_USER, controller_rules, setuser_args
from broker.schemas import BackendInfo, ModelInfo, NodeInfo
from controller.breaker import Breakers, backend_target
from controller.cli import ExitCode
from controller.health import Status, check_tunnels
from controller.tunnel import TunnelState
from tests.controller.cli.test_flower_command import start_corral_flower
from tests.controller.test_flower import FLOWER_CREDENTIALS
from tests.fakes.fake_ollama import running_fake_ollama
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    free_port,
    start_redis,
    start_worker,
    wait_until,
)

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


def doctor(
    broker_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CORRAL_BROKER_URL": broker_url, **(env or {})}
    for name in ("CORRAL_CONFIG", "CORRAL_FLOWER_URL", "CORRAL_FLOWER_AUTH"):
        if name not in (env or {}):
            full_env.pop(name, None)
    full_env.setdefault("CORRAL_STATE_DIR", "/nonexistent-corral-state")
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=full_env,
        cwd=REPO_ROOT,
    )


def checks_of(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], dict[str, Any]]:
    document = json.loads(result.stdout)
    return {(c["area"], c["name"]): c for c in document["checks"]}


def line_of(output: str, *words: str) -> str:
    for line in output.splitlines():
        if all(word in line for word in words):
            return line
    raise AssertionError(f"no line with {words} in:\n{output}")


@pytest.fixture(scope="module")
def good_redis() -> Iterator[RedisServer]:
    """Set up as corral wants it: AOF on, noeviction (the default)."""
    server = start_redis(appendonly=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def healthy_cluster(good_redis: RedisServer, module_log_dir: Path) -> Iterator[str]:
    url = good_redis.url.rsplit("/", 1)[0] + "/1"
    worker = start_worker(url, "alpha", *FAST, log_dir=module_log_dir)
    client = redis.Redis.from_url(url)
    wait_until(lambda: client.hexists("corral:nodes", "alpha"), 10, "alpha's heartbeat")
    yield url
    worker.stop()


def test_a_healthy_cluster_is_all_ticks_and_exit_0(healthy_cluster: str, tmp_path: Path) -> None:
    result = doctor(healthy_cluster, "--probe")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    out = result.stdout
    for area, name in [
        ("broker", "reachable"),
        ("broker", "persistence"),
        ("broker", "eviction"),
        ("broker", "version"),
        ("broker", "memory"),
        ("node alpha", "heartbeat"),
        ("node alpha", "version"),
        ("node alpha", "backend"),
        ("node alpha", "models"),
    ]:
        assert line_of(out, area, name).startswith("✓"), out
    probe = line_of(out, "probe", "alpha/simulated")
    assert probe.startswith("✓") and "first token" in probe and " ms" in probe
    assert line_of(out, "flower", "skipped").startswith("!")
    assert "✗" not in out
    assert "all is well" in out

    as_json = doctor(healthy_cluster, "--json")
    assert as_json.returncode == ExitCode.OK
    assert json.loads(as_json.stdout)["ok"] is True
    assert checks_of(as_json)[("broker", "persistence")]["status"] == "ok"


def test_flower_is_checked_for_reachability_and_auth(healthy_cluster: str, tmp_path: Path) -> None:
    flower = start_corral_flower(healthy_cluster, tmp_path)
    url = f"http://127.0.0.1:{flower.port}"
    try:
        good = checks_of(
            doctor(
                healthy_cluster,
                "--json",
                env={"CORRAL_FLOWER_URL": url, "CORRAL_FLOWER_AUTH": FLOWER_CREDENTIALS},
            )
        )
        assert good[("flower", "reachable")]["status"] == "ok"
        assert good[("flower", "auth")]["status"] == "ok"
        wrong = doctor(
            healthy_cluster,
            "--flower",
            url,
            env={"CORRAL_FLOWER_AUTH": "watcher:not-it"},
        )
        assert wrong.returncode == ExitCode.FAILED
        assert line_of(wrong.stdout, "flower", "auth").startswith("✗")
    finally:
        flower.stop()
    gone = doctor(healthy_cluster, "--flower", url)
    assert gone.returncode == ExitCode.FAILED
    assert line_of(gone.stdout, "flower", "reachable").startswith("✗")
    assert "corral flower" in gone.stdout  # the fix

    (tmp_path / "open").mkdir()
    open_flower = start_corral_flower(healthy_cluster, tmp_path / "open", credentials=None)
    try:
        result = doctor(healthy_cluster, "--flower", f"http://127.0.0.1:{open_flower.port}")
    finally:
        open_flower.stop()
    assert result.returncode == ExitCode.FAILED
    auth = line_of(result.stdout, "flower", "auth")
    assert auth.startswith("✗") and "answers without credentials" in auth
    assert "CORRAL_FLOWER_AUTH=user:password" in result.stdout


def test_a_node_whose_backend_is_down_needs_fixing(good_redis: RedisServer, tmp_path: Path) -> None:
    url = good_redis.url.rsplit("/", 1)[0] + "/2"
    dead = f"http://127.0.0.1:{free_port()}"
    beta: WorkerProcess = start_worker(url, "beta", "--openai-compat", dead, log_dir=tmp_path)
    try:
        client = redis.Redis.from_url(url)
        wait_until(lambda: client.hexists("corral:nodes", "beta"), 10, "beta's heartbeat")
        result = doctor(url)
        assert result.returncode == ExitCode.FAILED, result.stdout + result.stderr
        line = line_of(result.stdout, "node beta", "backend")
        assert line.startswith("✗") and dead in line and "unreachable" in line
        fix = result.stdout.splitlines()[result.stdout.splitlines().index(line) + 1]
        assert "fix: start the server on beta" in fix
        assert line_of(result.stdout, "node beta", "heartbeat").startswith("✓")
    finally:
        beta.stop()


def test_wrong_eviction_policy_and_no_aof_are_failures_with_their_fixes(tmp_path: Path) -> None:
    server = start_redis(appendonly=False)
    try:
        server.client().config_set("maxmemory-policy", "allkeys-lru")
        result = doctor(server.url)
        assert result.returncode == ExitCode.FAILED
        out = result.stdout
        eviction = line_of(out, "broker", "eviction")
        assert eviction.startswith("✗") and "allkeys-lru" in eviction
        assert "CONFIG SET maxmemory-policy noeviction" in out
        assert line_of(out, "broker", "persistence").startswith("✗")
        assert "CONFIG SET appendonly yes" in out
        assert line_of(out, "nodes", "registered").startswith("!")
        assert "2 to fix" in out

        document = checks_of(doctor(server.url, "--json"))
        assert document[("broker", "eviction")]["status"] == "fail"
        assert "noeviction" in document[("broker", "eviction")]["fix"]
    finally:
        server.stop()


def test_an_unreachable_broker_or_a_wrong_password_says_how_to_fix_it() -> None:
    down = doctor(f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == ExitCode.FAILED
    assert line_of(down.stdout, "broker", "reachable").startswith("✗")
    assert "Traceback" not in down.stderr

    server = start_redis(password="s3cret-doctor")
    try:
        wrong = doctor(f"redis://:not-the-password@127.0.0.1:{server.port}/0")
        assert wrong.returncode == ExitCode.FAILED
        assert line_of(wrong.stdout, "broker", "auth").startswith("✗")
        assert "not-the-password" not in wrong.stdout + wrong.stderr
        missing = doctor(f"redis://127.0.0.1:{server.port}/0")
        assert line_of(missing.stdout, "broker", "auth").startswith("✗")
    finally:
        server.stop()


def test_tunnels_are_up_or_named_with_their_reason() -> None:
    now = time.time()
    up = TunnelState(via="corral@gw:22", state="up", since=now, pid=os.getpid())
    down = TunnelState(
        via="corral@gw2:22", state="down", since=now, pid=os.getpid(), reason="cannot connect"
    )
    gone = TunnelState(via="corral@gw3:22", state="up", since=now, pid=2**22 + 12345)
    checks = check_tunnels([up, down, gone])
    assert [c.status for c in checks] == [Status.OK, Status.FAIL, Status.FAIL]
    assert "cannot connect" in checks[1].detail
    assert "not running" in checks[2].detail
    assert check_tunnels([])[0].status is Status.SKIP


def heartbeat(name: str, version: str, *, models: tuple[ModelInfo, ...]) -> NodeInfo:
    backend = BackendInfo(
        name="ollama", kind="ollama", url="http://127.0.0.1:11434", healthy=True, capacity=1,
        models=models,
    )  # fmt: skip
    now = time.time()
    return NodeInfo(
        name=name, version=version, backends=(backend,), in_flight=0, capacity=1,
        heartbeat_interval_s=2, started_at=now - 60, sent_at=now - 30,
    )  # fmt: skip


def test_version_skew_a_down_node_an_unreadable_heartbeat_and_an_open_breaker(
    broker_url: str,
) -> None:
    client = redis.Redis.from_url(broker_url)
    old = heartbeat("old", "0.0.9", models=(ModelInfo(name="llama3.2:1b", loaded=True),))
    empty = heartbeat("empty", __version__, models=())
    gone = heartbeat("gone", __version__, models=(ModelInfo(name="llama3.2:1b"),))
    for info in (old, empty, gone):
        client.hset(names.NODES_HASH, info.name, info.model_dump_json())
    for info in (old, empty):  # "gone" has no liveness key: it stopped heartbeating
        client.set(names.node_alive_key(info.name), info.instance, ex=60)
    client.hset(names.NODES_HASH, "future", '{"v": 99, "name": "future"}')
    breakers = Breakers(client, threshold=3, cooldown_s=30)
    for _ in range(3):
        breakers.record_failure(backend_target("old", "ollama"))
    breakers.hold(backend_target("empty", "ollama"), 600, "quota_exhausted")

    result = doctor(broker_url)
    out = result.stdout
    assert result.returncode == ExitCode.FAILED, out + result.stderr
    version = line_of(out, "node old", "version")
    assert version.startswith("!") and "0.0.9" in version and __version__ in version
    breaker = line_of(out, "node old", "breaker")
    assert breaker.startswith("✗") and "open on old/ollama after 3 failures" in breaker
    assert "corral nodes --reset-breaker old/ollama" in out
    held = line_of(out, "node empty", "breaker")  # its provider's word: a warning, with the wait
    assert held.startswith("!") and "empty/ollama is quota exhausted, as its provider said" in held
    assert line_of(out, "node empty", "models").startswith("!")
    down = line_of(out, "node gone", "heartbeat")
    assert down.startswith("✗") and re.search(r"last heartbeat 3\d\.\d s ago", down), down
    assert line_of(out, "node future", "heartbeat").startswith("✗")
    assert "another wire schema version" in out


def test_a_least_privilege_controller_user_gets_a_warning_not_a_failure(
    good_redis: RedisServer, healthy_cluster: str
) -> None:
    db = int(healthy_cluster.rsplit("/", 1)[1])
    admin = good_redis.client()
    admin.execute_command(*setuser_args(CONTROLLER_USER, "ctl-pw", controller_rules(db)))
    try:
        url = f"redis://{CONTROLLER_USER}:ctl-pw@127.0.0.1:{good_redis.port}/{db}"
        result = doctor(url)
        out = result.stdout
        assert result.returncode == ExitCode.OK, out + result.stderr
        assert line_of(out, "broker", "info").startswith("!")
        assert "with an admin user" in out
        assert line_of(out, "node alpha", "heartbeat").startswith("✓")  # read as the user may
        assert "ctl-pw" not in out
    finally:
        admin.execute_command("ACL", "DELUSER", CONTROLLER_USER)


def test_probe_times_every_backend_of_a_node(good_redis: RedisServer, tmp_path: Path) -> None:
    url = good_redis.url.rsplit("/", 1)[0] + "/3"
    with running_fake_ollama(("llama3.2:1b",), loaded=("llama3.2:1b",)) as ollama:
        gamma = start_worker(
            url, "gamma", *FAST, "--ollama", ollama.url, log_dir=tmp_path
        )  # fmt: skip
        try:
            client = redis.Redis.from_url(url)
            wait_until(lambda: client.hexists("corral:nodes", "gamma"), 10, "gamma's heartbeat")
            result = doctor(url, "--probe")
        finally:
            gamma.stop()
    out = result.stdout
    assert result.returncode == ExitCode.OK, out + result.stderr
    simulated = line_of(out, "probe", "gamma/simulated")
    assert simulated.startswith("✓") and "sim-small: first token" in simulated
    fronted = line_of(out, "probe", "gamma/ollama")
    assert fronted.startswith("✓") and "llama3.2:1b: first token" in fronted
    assert "served by" not in out  # each probe reached the backend it was meant for
