"""Running site.yml on this machine for the rollout tests: the local inventory's environment,
the run's recap, and starting what it rendered (Redis, the worker) as their units would."""

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
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from controller.localcluster import free_port, stop_process
from tests.rollout.units import (
    directive,
    exec_start,
    kill_signal,
    service_environment,
)
from tests.support.servers import REPO_ROOT, wait_until
from tests.support.ssh_server import SSHServer

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
    worker_password: str
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


def run_site(root: Path, ssh: SSHServer) -> Rollout:
    """Build a wheel of this checkout and run site.yml once with everything under ``root``;
    the node's tunnel goes through ``ssh``."""
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
    worker_password = secrets.token_hex(16)
    port = free_port()
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
        "CORRAL_TEST_WORKER_PASSWORD": worker_password,
        "CORRAL_TEST_CORRAL": str(_this_checkouts_corral(root)),
        "CORRAL_TEST_REDIS_PORT": str(port),
        "CORRAL_TEST_WHEEL": str(wheel),
        "CORRAL_TEST_USER": getpass.getuser(),
        "CORRAL_TEST_GROUP": grp.getgrgid(os.getgid()).gr_name,
        "CORRAL_TEST_TUNNEL_KEY": str(ssh.write_identity()),
        "CORRAL_TEST_TUNNEL_KNOWN_HOST": ssh.write_known_hosts().read_text().strip(),
        "CORRAL_TEST_TUNNEL_VIA": ssh.via,
        "CORRAL_TEST_TUNNEL_PORT": str(free_port()),
        "CORRAL_TEST_FLOWER_PORT": str(free_port()),
        "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    rollout = Rollout(prefix, password, worker_password, port, env, None, 0.0)  # type: ignore[arg-type]
    started = time.monotonic()
    rollout.first_run = rollout.playbook()
    rollout.first_run_s = time.monotonic() - started
    return rollout


def _this_checkouts_corral(root: Path) -> Path:
    """`corral` as this checkout's code runs it, for the broker role's `corral acl` (run on the
    machine running Ansible): the venv's entry point may be another checkout's."""
    script = root / "corral"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m controller "$@"\n'
    )
    script.chmod(0o755)
    return script


@contextlib.contextmanager
def rendered_redis_server(rollout: Rollout) -> Iterator[redis.Redis]:
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
    assert rollout.worker_password not in log_path.read_text()


def broker_url(rollout: Rollout) -> str:
    return f"redis://:{rollout.password}@127.0.0.1:{rollout.port}/0"


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
