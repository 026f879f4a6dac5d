"""site.yml, for real, on this machine: the roles lint at ansible-lint's production profile, the
playbook runs twice against a local inventory (the second run changes nothing), and what it
rendered works: Redis started with the rendered redis.conf demands its password, and a worker
started exactly as the rendered unit says (ExecStart, Environment=, EnvironmentFile=) from the
virtual environment the role built joins that Redis and serves a job.

systemd, apt and user accounts are switched off by the test inventory (ansible/tests/); every
file lands under a temporary prefix.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import grp
import hashlib
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.localcluster import free_port, stop_process
from tests.rollout.units import (
    directive,
    exec_start,
    kill_signal,
    parse_environment_file,
    service_environment,
)
from tests.support.servers import REPO_ROOT, wait_until

# The first run downloads corral's dependencies into the role's venv: slower on a cold pip cache.
pytestmark = [pytest.mark.ansible, pytest.mark.timeout(420)]

ANSIBLE_DIR = REPO_ROOT / "ansible"
TOOLS = Path(sys.executable).parent


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: pip install -e '.[test]'")
    return str(path)


@dataclass
class Rollout:
    prefix: Path
    password: str
    port: int
    env: dict[str, str]
    first_run: subprocess.CompletedProcess[str]
    first_run_s: float

    def path(self, relative: str) -> Path:
        return self.prefix / relative

    def playbook(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("ansible-playbook"), "-i", "tests/inventory.yml", "site.yml", *args],
            cwd=ANSIBLE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )


def recap(run: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = re.search(r"localhost\s+:\s+(.*)", run.stdout.split("PLAY RECAP")[-1])
    assert match, run.stdout + run.stderr
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Rollout:
    root = tmp_path_factory.mktemp("rollout")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("corral-*.whl")
    prefix = root / "prefix"
    # What a Debian host has before the roles run: Redis's config folder and systemd's.
    for folder in ("etc/redis", "etc/systemd/system"):
        (prefix / folder).mkdir(parents=True)
    password = secrets.token_hex(16)
    port = free_port()
    tunnel_key = root / "tunnel_ed25519"
    tunnel_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ntest only\n")
    # Not this checkout's PYTHONPATH: pip in the role's venv would take it for an installed corral.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CORRAL_"))},
        "ANSIBLE_HOME": str(root / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
        "CORRAL_TEST_PREFIX": str(prefix),
        "CORRAL_TEST_ANSIBLE_PYTHON": sys.executable,
        # The role's venv is made by this Python (3.11+), without this venv's packages.
        "CORRAL_TEST_VENV_PYTHON": sys.executable,
        "CORRAL_TEST_REDIS_PASSWORD": password,
        "CORRAL_TEST_REDIS_PORT": str(port),
        "CORRAL_TEST_WHEEL": str(wheel),
        "CORRAL_TEST_USER": getpass.getuser(),
        "CORRAL_TEST_GROUP": grp.getgrgid(os.getgid()).gr_name,
        "CORRAL_TEST_TUNNEL_KEY": str(tunnel_key),
        "CORRAL_TEST_FLOWER_PORT": str(free_port()),
        "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    rollout = Rollout(prefix, password, port, env, None, 0.0)  # type: ignore[arg-type]
    started = time.monotonic()
    rollout.first_run = rollout.playbook()
    rollout.first_run_s = time.monotonic() - started
    return rollout


def test_the_roles_pass_ansible_lint_at_the_production_profile() -> None:
    run = subprocess.run(
        [tool("ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Profile 'production' was required, and it passed" in run.stdout + run.stderr


def test_site_yml_passes_the_syntax_check_with_the_example_inventory() -> None:
    run = subprocess.run(
        [tool("ansible-playbook"), "-i", "inventory.example.yml", "site.yml", "--syntax-check"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_site_yml_installs_and_a_second_run_changes_nothing(rollout: Rollout) -> None:
    first = rollout.first_run
    assert first.returncode == 0, first.stdout + first.stderr
    assert recap(first)["changed"] > 0
    second = rollout.playbook()
    assert second.returncode == 0, second.stdout + second.stderr
    assert recap(second)["changed"] == 0, second.stdout
    assert recap(second)["failed"] == 0


def test_secrets_stay_in_the_environment_files(rollout: Rollout) -> None:
    for env_file in (
        "etc/corral/worker.env",
        "etc/corral/flower.env",
        "etc/corral/tunnel.env",
        "etc/corral/tunnel_id",
    ):
        mode = stat.S_IMODE(rollout.path(env_file).stat().st_mode)
        assert mode == 0o600, f"{env_file} has mode {oct(mode)}"
    assert parse_environment_file(rollout.path("etc/corral/worker.env").read_text()) == {
        "REDIS_PASSWORD": rollout.password
    }
    for public in (
        "etc/corral/worker.yaml",
        "etc/corral/corral.yaml",
        "etc/systemd/system/corral-worker.service",
        "etc/systemd/system/corral-flower.service",
        "etc/systemd/system/corral-tunnel.service",
    ):
        text = rollout.path(public).read_text()
        assert rollout.password not in text, public
        assert text.startswith("#\n# Ansible managed"), public
    assert "${REDIS_PASSWORD}" in rollout.path("etc/corral/worker.yaml").read_text()
    # The playbook's own output never shows them either.
    assert rollout.password not in rollout.first_run.stdout + rollout.first_run.stderr


def test_the_controllers_corral_yaml_gives_corral_its_settings(
    rollout: Rollout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_CONFIG", str(rollout.path("etc/corral/corral.yaml")))
    monkeypatch.setenv("REDIS_PASSWORD", rollout.password)
    settings = build_settings()
    assert settings.broker_url.get_secret_value() == broker_url(rollout)
    assert settings.max_attempts == 2
    assert settings.aliases == {"coder": ("qwen2.5-coder:7b", "deepseek-coder:6.7b")}


def test_the_tunnel_unit_runs_corral_tunnel_with_the_rendered_key_and_host_keys(
    rollout: Rollout,
) -> None:
    unit = rollout.path("etc/systemd/system/corral-tunnel.service").read_text()
    config = rollout.path("etc/corral")
    assert exec_start(unit) == [
        str(rollout.path("opt/corral/venv/bin/corral")),
        "tunnel",
        "--via",
        "corral@127.0.0.1",
        "--known-hosts",
        str(config / "tunnel_known_hosts"),
        "--identity",
        str(config / "tunnel_id"),
    ]
    assert directive(unit, "Restart") == "always"
    assert service_environment(unit) == {
        "CORRAL_BROKER_URL": f"redis://:{rollout.password}@127.0.0.1:{rollout.port}/0"
    }
    assert "127.0.0.1 ssh-ed25519 " in (config / "tunnel_known_hosts").read_text()


def test_a_typo_in_a_role_variable_fails_the_play(rollout: Rollout) -> None:
    run = rollout.playbook("-e", '{"corral_broker_bnd": ["0.0.0.0"]}')
    assert run.returncode != 0
    assert "unknown variable(s) corral_broker_bnd" in run.stdout


@pytest.mark.parametrize(
    ("extra_vars", "complaint"),
    [
        ('{"corral_worker_secrets": {"VLLM_KEY": "has a space"}}', "values plain"),
        ('{"corral_worker_name": "gpu 1"}', "corral_worker_name must be"),
        ('{"corral_worker_backends": [{"kind": "olama", "url": "http://x"}]}', "olama"),
    ],
)
def test_bad_worker_settings_fail_before_anything_is_written(
    rollout: Rollout, extra_vars: str, complaint: str
) -> None:
    before = rollout.path("etc/corral/worker.yaml").read_text()
    run = rollout.playbook("--tags", "nodes", "-e", extra_vars)
    assert run.returncode != 0
    assert complaint in run.stdout, run.stdout
    assert rollout.path("etc/corral/worker.yaml").read_text() == before


@pytest.fixture(scope="module")
def rendered_redis(rollout: Rollout) -> Iterator[redis.Redis]:
    """redis-server started with the rendered redis.conf, as its unit would."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    process = subprocess.Popen(
        [binary, str(rollout.path("etc/redis/redis.conf"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=rollout.port, password=rollout.password)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_until(answers, 10, "redis-server with the rendered redis.conf")
        yield client
    finally:
        client.close()
        stop_process(process)


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


@contextlib.contextmanager
def rolled_worker(rollout: Rollout, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The worker started exactly as its rendered unit says; stopped with the unit's
    KillSignal, after which it must have exited cleanly."""
    unit = rollout.path("etc/systemd/system/corral-worker.service").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))}
    env |= service_environment(unit)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            exec_start(unit),
            env=env,
            cwd=directive(unit, "WorkingDirectory"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "ready." in log_path.read_text() or process.poll() is not None,
            60,
            "the rolled-out worker to be ready",
        )
        assert process.poll() is None, log_path.read_text()
        yield process
    finally:
        process.send_signal(kill_signal(unit))
        code = process.wait(timeout=60)
    assert code == 0, log_path.read_text()
    assert rollout.password not in log_path.read_text()


def broker_url(rollout: Rollout) -> str:
    return f"redis://:{rollout.password}@127.0.0.1:{rollout.port}/0"


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
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", headers=headers if auth else {}
        )
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


def rebuilt_wheel(wheel: Path, out_dir: Path, extra_name: str, extra_text: str) -> Path:
    """The same wheel (same file name and version) with one more module: a new build of the
    same version, as a developer's next commit gives."""
    out_dir.mkdir()
    out = out_dir / wheel.name
    data = extra_text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            content = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                content += f"{extra_name},sha256={digest},{len(data)}\n".encode()
            target.writestr(item, content)
        target.writestr(extra_name, data)
    return out


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
