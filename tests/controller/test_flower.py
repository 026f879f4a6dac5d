"""Watching the cluster with a real Flower: it turns task events on and never sees a prompt.

Workers start with task events off (``CORRAL_TASK_EVENTS=false``, the default); Flower's
``--enable_events`` (on by default) broadcasts the ``enable_events`` control command every
5 s, after which the worker reports its jobs to Flower, showing the short ``argsrepr``
instead of the prompt.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from broker import names
from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.localcluster import stop_process
from tests.support.servers import WorkerProcess, free_port, start_worker, wait_until

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
SECRET = "the secret launch code is 0000"
FLOWER_CREDENTIALS = "watcher:hunter2-not-a-real-password"


@dataclass
class FlowerProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: BinaryIO | None = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout_s: float = 5) -> tuple[int, str]:
        """GET ``path`` with the basic-auth credentials; returns (status, body)."""
        token = base64.b64encode(FLOWER_CREDENTIALS.encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Basic {token}", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), exc.read().decode(errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path} -> {status}: {body}\n{self.log()}"
        return json.loads(body)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited early:\n{self.log()}")
        try:
            return self.get("/healthcheck", timeout_s=1)[0] == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 10) -> None:
        stop_process(self.process, timeout_s=timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_flower(broker_url: str, workdir: Path) -> FlowerProcess:
    """``celery --broker URL flower`` on a free local port, with no app module and basic auth."""
    port = free_port()
    log_path = workdir / "flower.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in FlowerProcess.stop
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--broker",
            broker_url,
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic_auth={FLOWER_CREDENTIALS}",
            f"--db={workdir / 'flower-db'}",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        # Flower reads FLOWER_* variables as options: none from the caller's environment.
        env={k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")},
        # An empty directory: no flowerconfig.py or celeryconfig.py to pick up by accident.
        cwd=workdir,
    )
    flower = FlowerProcess(port, process, log_path, log_file)
    try:
        wait_until(flower.answers, 15, "flower to answer /healthcheck", interval_s=0.1)
    except BaseException:
        flower.stop()
        raise
    return flower


@pytest.fixture
def worker(broker_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = start_worker(
        broker_url, "alpha", *FAST, log_dir=tmp_path, env={"CORRAL_TASK_EVENTS": "false"}
    )
    yield process
    process.stop()


@pytest.fixture
def flower(broker_url: str, tmp_path: Path, worker: WorkerProcess) -> Iterator[FlowerProcess]:
    workdir = tmp_path / "flower"
    workdir.mkdir()
    process = start_flower(broker_url, workdir)
    yield process
    process.stop()


@pytest.fixture
def client(broker_url: str, worker: WorkerProcess) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=broker_url)) as c:
        wait_until(lambda: any(n.up for n in c.nodes()), 10, "node alpha up")
        yield c


def run_job(client: CorralClient, prompt: str) -> str:
    spec = make_spec(prompt, node="alpha")
    events = list(client.stream(spec))
    assert isinstance(events[-1], DoneEvent), events[-1]
    assert events[-1].result.status == "ok"
    return spec.job_id


def flower_task(flower: FlowerProcess, job_id: str) -> dict[str, Any] | None:
    status, body = flower.get(f"/api/task/info/{job_id}")
    if status == 404:
        return None
    assert status == 200, f"{status}: {body}"
    task: dict[str, Any] = json.loads(body)
    return task


def shows_up(flower: FlowerProcess, job_id: str, within_s: float) -> bool:
    try:
        wait_until(lambda: flower_task(flower, job_id) is not None, within_s, "task in flower")
    except TimeoutError:
        return False
    return True


def test_flower_enables_task_events_and_shows_jobs_without_their_prompts(
    flower: FlowerProcess, worker: WorkerProcess, client: CorralClient
) -> None:
    # Flower broadcasts enable_events every 5 s; until then the worker sends no task events.
    # Run harmless probe jobs until one of them shows up in Flower.
    deadline = time.monotonic() + 20
    while not shows_up(flower, run_job(client, "probe: are task events on yet"), within_s=1):
        if time.monotonic() > deadline:
            raise AssertionError(
                "flower never saw a task: task events were not enabled on the worker\n"
                f"--- worker log ---\n{worker.log()}\n--- flower log ---\n{flower.log()}"
            )
    assert "Events of group {task} enabled by remote" in worker.log()

    job_id = run_job(client, SECRET)

    def succeeded() -> bool:
        task = flower_task(flower, job_id)
        return task is not None and task["state"] == "SUCCESS"

    wait_until(succeeded, 10, "the job to show as SUCCESS in flower")
    expected_args = f"job={job_id} node=alpha model=sim-small attempt=1"

    status, info_body = flower.get(f"/api/task/info/{job_id}")
    assert status == 200
    info = json.loads(info_body)
    assert info["name"] == names.RUN_JOB_TASK
    assert info["uuid"] == job_id
    assert info["state"] == "SUCCESS"
    assert info["args"] == expected_args
    assert info["kwargs"] == "{}"
    assert info["worker"].startswith("alpha@")

    status, tasks_body = flower.get("/api/tasks")
    assert status == 200
    tasks = json.loads(tasks_body)
    assert job_id in tasks
    listed = tasks[job_id]
    assert listed["name"] == names.RUN_JOB_TASK
    assert listed["state"] == "SUCCESS"
    assert listed["args"] == expected_args
    assert listed["worker"] == info["worker"]

    # The worker is online (heartbeat events) and consumes its own queue (inspect).
    alive = flower.get_json("/api/workers?status=1")
    assert alive.get(info["worker"]) is True, alive
    status, workers_body = flower.get("/api/workers?refresh=1")
    assert status == 200, workers_body
    workers = json.loads(workers_body)
    assert info["worker"] in workers, workers
    queues = [q["name"] for q in workers[info["worker"]]["active_queues"]]
    assert queues == [names.node_queue("alpha")]
    assert names.RUN_JOB_TASK in workers[info["worker"]]["registered"]

    # The prompt never reaches Flower: not in a task, the list, the worker view, or the page.
    _, task_page = flower.get(f"/task/{job_id}")
    assert job_id in task_page
    for what, body in [
        ("task info", info_body),
        ("tasks list", tasks_body),
        ("workers", workers_body),
        ("task page", task_page),
    ]:
        assert SECRET not in body, f"the prompt leaked into flower's {what}"
        assert "launch code" not in body, f"part of the prompt leaked into flower's {what}"
