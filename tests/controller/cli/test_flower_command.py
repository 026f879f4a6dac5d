"""``corral flower`` as a user runs it: its own process, a real worker, Flower's HTTP API.

It refuses to listen beyond loopback without credentials, asks for them (401) when it has
them, keeps them off its command line, and lists the worker and a finished job (id, node,
model; never the prompt).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker import names
from broker.settings import build_settings
from controller.cli import ExitCode, cli
from controller.client import CorralClient
from controller.flower import plan_flower
from tests.controller.test_flower import (
    FLOWER_CREDENTIALS,
    SECRET,
    FlowerProcess,
    flower_task,
    run_job,
    shows_up,
)
from tests.support.servers import REPO_ROOT, WorkerProcess, free_port, start_worker, wait_until

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
PASSWORD = FLOWER_CREDENTIALS.split(":", 1)[1]


def start_corral_flower(
    broker_url: str, workdir: Path, credentials: str | None = FLOWER_CREDENTIALS
) -> FlowerProcess:
    """``corral flower --port P`` with ``CORRAL_FLOWER_AUTH`` set, as docker-compose runs it
    (``credentials=None``: without, so on loopback and open to anyone there)."""
    port = free_port()
    log_path = workdir / "corral-flower.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in FlowerProcess.stop
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.pop("CORRAL_CONFIG", None)
    env.pop("CORRAL_FLOWER_AUTH", None)
    env.update(
        CORRAL_BROKER_URL=broker_url,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    if credentials is not None:
        env["CORRAL_FLOWER_AUTH"] = credentials
    process = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "flower", "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,  # no flowerconfig.py to pick up by accident
    )
    flower = FlowerProcess(port, process, log_path, log_file)
    try:
        wait_until(flower.answers, 20, "corral flower to answer", interval_s=0.1)
    except BaseException:
        flower.stop()
        raise
    return flower


def get_without_credentials(port: int, path: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


def get_with(port: int, path: str, credentials: str) -> int:
    token = base64.b64encode(credentials.encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


@pytest.fixture
def worker(broker_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = start_worker(broker_url, "alpha", *FAST, log_dir=tmp_path)
    yield process
    process.stop()


@pytest.fixture
def flower(broker_url: str, tmp_path: Path, worker: WorkerProcess) -> Iterator[FlowerProcess]:
    workdir = tmp_path / "flower"
    workdir.mkdir()
    process = start_corral_flower(broker_url, workdir)
    yield process
    process.stop()


def test_corral_flower_asks_for_credentials_and_shows_workers_and_jobs(
    broker_url: str, flower: FlowerProcess, worker: WorkerProcess
) -> None:
    for path in ("/api/workers", "/api/tasks", "/"):
        assert get_without_credentials(flower.port, path) == 401, path
    assert get_with(flower.port, "/api/workers", "watcher:wrong-password") == 401

    # The password is on no command line `ps` shows.
    cmdline = Path(f"/proc/{flower.process.pid}/cmdline").read_bytes().replace(b"\0", b" ")
    assert PASSWORD.encode() not in cmdline
    assert b"flower --port" in cmdline

    with CorralClient(build_settings(broker_url=broker_url)) as client:
        wait_until(lambda: any(n.up for n in client.nodes()), 10, "node alpha up")
        deadline = time.monotonic() + 20  # Flower switches task events on every 5 s
        while not shows_up(flower, run_job(client, "probe"), within_s=1):
            assert time.monotonic() < deadline, f"no task reached flower:\n{flower.log()}"
        job_id = run_job(client, SECRET)

    def finished() -> bool:
        task = flower_task(flower, job_id)
        return task is not None and task["state"] == "SUCCESS"

    wait_until(finished, 10, "the job to show as SUCCESS in flower")
    status, info_body = flower.get(f"/api/task/info/{job_id}")
    assert status == 200
    info = json.loads(info_body)
    assert info["name"] == names.RUN_JOB_TASK
    assert info["args"] == f"job={job_id} node=alpha model=sim-small attempt=1"
    assert info["worker"].startswith("alpha@")

    status, workers_body = flower.get("/api/workers?refresh=1")
    assert status == 200, workers_body
    workers = json.loads(workers_body)
    assert [q["name"] for q in workers[info["worker"]]["active_queues"]] == [
        names.node_queue("alpha")
    ]
    _, tasks_body = flower.get("/api/tasks")
    for body in (info_body, workers_body, tasks_body):
        assert "launch code" not in body
    assert PASSWORD not in flower.log()


def test_without_credentials_it_refuses_every_interface_but_loopback() -> None:
    runner = CliRunner()
    env = {"CORRAL_FLOWER_AUTH": "", "FLOWER_BASIC_AUTH": ""}
    result = runner.invoke(cli, ["flower", "--address", "0.0.0.0"], env=env)
    assert result.exit_code == ExitCode.USAGE
    assert "refusing to serve Flower on 0.0.0.0 without credentials" in result.output
    assert "CORRAL_FLOWER_AUTH" in result.output

    # Without an address it listens on loopback; with credentials, on every interface.
    assert plan_flower(port=5555, address=None, basic_auth=None, environ={}).address == (
        "127.0.0.1"
    )
    with_auth = plan_flower(
        port=5555, address=None, basic_auth=None, environ=env | {"CORRAL_FLOWER_AUTH": "me:pw"}
    )
    assert with_auth.address == "0.0.0.0"
    assert plan_flower(port=1, address="::1", basic_auth=None, environ={}).address == "::1"


@pytest.mark.parametrize("given", ["only-a-user", "me:", ":pw", "me:pw,broken"])
def test_malformed_credentials_are_refused_without_repeating_them(given: str) -> None:
    result = CliRunner().invoke(cli, ["flower", "--basic-auth", given])
    assert result.exit_code == ExitCode.USAGE
    assert "must be user:password" in result.output
    assert given not in result.output
    assert "Traceback" not in result.output
