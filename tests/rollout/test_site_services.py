"""What site.yml rendered works when started as its units say: Redis from the rendered
redis.conf demands its password, the worker from the rendered unit (ExecStart, Environment=,
EnvironmentFile=) in the venv the role built serves a job, the role pulls and warms models
through it, Flower asks for its password; and a new build of the same version is installed
(last: it changes the installed corral).
"""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from broker import acl, names
from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.localcluster import stop_process
from tests.rollout.site_run import Rollout, broker_url, rebuilt_wheel, rolled_worker
from tests.rollout.units import (
    directive,
    exec_start,
    kill_signal,
    service_environment,
)
from tests.support.servers import wait_until

# The first run downloads corral's dependencies into the role's venv: slower on a cold pip cache.
pytestmark = [pytest.mark.ansible, pytest.mark.timeout(420)]


def test_the_rendered_redis_conf_demands_the_password_and_keeps_jobs(
    rollout: Rollout, rendered_redis: redis.Redis
) -> None:
    anonymous = redis.Redis(port=rollout.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    assert rendered_redis.config_get("appendonly") == {"appendonly": "yes"}
    assert rendered_redis.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert rendered_redis.config_get("bind") == {"bind": "127.0.0.1"}


def test_the_acl_file_the_role_wrote_gives_the_worker_only_its_own_rights(
    rollout: Rollout, rendered_redis: redis.Redis
) -> None:
    acl_file = rollout.path("etc/redis/users.acl")
    assert stat.S_IMODE(acl_file.stat().st_mode) == 0o640
    assert rendered_redis.config_get("aclfile") == {"aclfile": str(acl_file)}
    worker = redis.Redis(
        port=rollout.port, username=acl.worker_user("rolled"), password=rollout.worker_password
    )
    try:
        assert worker.ping()
        for refused in (
            worker.flushall,
            lambda: worker.config_get("*"),
            lambda: worker.set(names.node_alive_key("someone-else"), "1"),
            lambda: worker.set(names.ROUTES_HASH, "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        # Its own liveness key is its to write.
        assert worker.set(names.node_alive_key("rolled"), "1", ex=5)
    finally:
        worker.close()
    # The broker's password is the admin's (Redis's default user, which just read CONFIG
    # above): an ACL file replaces requirepass, and without that user Redis would be open.
    assert rendered_redis.acl_whoami() == "default"


def test_a_worker_started_as_the_rendered_unit_says_serves_a_job(
    rollout: Rollout, rendered_redis: redis.Redis, tmp_path: Path
) -> None:
    unit = rollout.path("etc/systemd/system/corral-worker.service").read_text()
    # The installed corral, not this checkout, serves it.
    assert exec_start(unit)[0] == str(rollout.path("opt/corral/venv/bin/corral"))
    # TimeoutStopSec outlasts Celery's hard limit on a job (job_timeout_s + 30): a stop drains.
    assert int(directive(unit, "TimeoutStopSec")) > 600 + 30
    with (
        rolled_worker(rollout, tmp_path / "worker.log"),
        CorralClient(build_settings(broker_url=broker_url(rollout))) as client,
    ):
        events = list(client.stream(make_spec("hello from the rollout", node="rolled")))
    done = events[-1]
    assert isinstance(done, DoneEvent), events
    assert done.result.node == "rolled" and done.result.text


def test_the_role_pulls_and_warms_the_nodes_models_through_corral(
    rollout: Rollout, rendered_redis: redis.Redis, tmp_path: Path
) -> None:
    """The simulated backend manages pretend models as Ollama does: a pull downloads, a warm
    loads. The role asks the node through `corral models`, as for a real Ollama."""
    models = '{"corral_worker_models": ["sim-vision"], "corral_worker_warm_models": ["sim-large"]}'
    with (
        rolled_worker(rollout, tmp_path / "worker.log"),
        CorralClient(build_settings(broker_url=broker_url(rollout))) as client,
    ):
        run = rollout.playbook("--tags", "nodes", "-e", models)
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r"Pull the node's missing models\] \*+\nchanged", run.stdout), run.stdout
        (node,) = [n for n in client.nodes() if n.info.name == "rolled"]
    held = {m.name: m.loaded for b in node.info.backends for m in b.models}
    assert "sim-vision" in held
    assert held["sim-large"] is True
    assert rollout.password not in run.stdout


def test_the_tunnel_started_as_its_rendered_unit_says_leads_to_the_broker(
    rollout: Rollout, rendered_redis: redis.Redis, tmp_path: Path
) -> None:
    """corral tunnel from the rendered unit, through the test's SSH server, with the key and
    host keys the role copied: Redis answers on the node's local port."""
    unit = rollout.path("etc/systemd/system/corral-tunnel.service").read_text()
    config = rollout.path("etc/corral")
    local_port = int(rollout.env["CORRAL_TEST_TUNNEL_PORT"])
    argv = exec_start(unit)
    assert argv == [
        str(rollout.path("opt/corral/venv/bin/corral")),
        "tunnel",
        "--via",
        rollout.env["CORRAL_TEST_TUNNEL_VIA"],
        "--known-hosts",
        str(config / "tunnel_known_hosts"),
        "--identity",
        str(config / "tunnel_id"),
        "--local-port",
        str(local_port),
        "--remote",
        f"127.0.0.1:{rollout.port}",
    ]
    assert directive(unit, "Restart") == "always"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))}
    env |= service_environment(unit)
    log_path = tmp_path / "tunnel.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    through = redis.Redis(port=local_port, password=rollout.password, socket_timeout=2)

    def answers() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return bool(through.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_until(answers, 30, "Redis through the rolled-out tunnel")
        through.set("corral:test:through-the-tunnel", "yes")
        assert rendered_redis.get("corral:test:through-the-tunnel") == b"yes"
    finally:
        through.close()
        process.send_signal(kill_signal(unit))
        code = process.wait(timeout=30)
    assert code == 0, log_path.read_text()


def test_flower_started_as_its_rendered_unit_says_asks_for_the_password(
    rollout: Rollout, rendered_redis: redis.Redis, tmp_path: Path
) -> None:
    unit = rollout.path("etc/systemd/system/corral-flower.service").read_text()
    argv = exec_start(unit)
    assert argv[1:3] == ["flower", "--port"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))}
    env |= service_environment(unit)
    assert env["CORRAL_FLOWER_AUTH"] == "watcher:test-only-flower-password"
    has_flower = subprocess.run(
        [argv[0], "flower", "--help"], env=env, capture_output=True, timeout=60
    )
    if has_flower.returncode != 0:
        pytest.skip("this corral has no `corral flower` command yet")
    port = int(argv[3])
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=directive(unit, "WorkingDirectory"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def status(auth: str | None, path: str = "/api/workers") -> int:
        headers = {}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)

    def answers() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            status(None, "/healthcheck")  # Flower's only page without a login
        except OSError:
            return False
        return True

    try:
        wait_until(answers, 60, "Flower from the rendered unit to answer")
        assert status(None) == 401
        assert status(env["CORRAL_FLOWER_AUTH"]) == 200
    finally:
        stop_process(process)
    assert rollout.password not in log_path.read_text()


def test_a_new_build_of_the_same_version_is_installed_and_restarts_the_worker(
    rollout: Rollout, tmp_path: Path
) -> None:
    wheel = Path(rollout.env["CORRAL_TEST_WHEEL"])
    new = rebuilt_wheel(wheel, tmp_path / "dist", "worker/rollout_marker.py", "BUILD = 2\n")
    rollout.env["CORRAL_TEST_WHEEL"] = str(new)
    run = rollout.playbook("--tags", "nodes")  # as the README's upgrade of the workers does
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"Reinstall corral \(worker\)\] \*+\nchanged", run.stdout), run.stdout
    assert "RUNNING HANDLER [corral_worker : Restart corral worker]" in run.stdout
    venv_python = rollout.path("opt/corral/venv/bin/python")
    probe = subprocess.run(
        [str(venv_python), "-c", "import worker.rollout_marker as m; print(m.BUILD)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
    )
    assert probe.stdout.strip() == "2", probe.stderr
