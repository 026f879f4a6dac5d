"""The gateway as users meet it: ``python -m controller.gateway`` (what ``corral serve``
execs) in its own process on a free loopback port, in front of real workers on real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controller.localcluster import free_port, stop_process
from tests.support.servers import REPO_ROOT, WorkerProcess, running_workers

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_gateway(
    broker_url: str,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = ("-m", "controller.gateway"),
) -> Iterator[Gateway]:
    """``python -m controller.gateway ARGS``; ``command`` ``("-m", "controller", "serve")``
    starts it as ``corral serve`` does."""
    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    full_env.update({"CORRAL_BROKER_URL": broker_url, **(env or {})})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *command, "--port", str(port), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO_ROOT,
        )
        gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
        try:
            _wait_answering(gateway)
            yield gateway
        finally:
            stop_process(process, timeout_s=10)


def _wait_answering(gateway: Gateway, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"the gateway exited early:\n{gateway.log()}")
        try:
            if httpx.get(gateway.url + "/", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the gateway never answered:\n{gateway.log()}")


def wait_for_models(gateway: Gateway, want: set[str], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(gateway.v1 + "/models", timeout=5)
        if answer.status_code == 200 and want <= {m["id"] for m in answer.json()["data"]}:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the gateway never listed {want}")


@pytest.fixture(scope="module")
def sim_workers(module_broker_url: str, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("alpha", [*FAST, "--tags", "gpu"]),
        ("beta", FAST),
    ) as workers:
        yield workers


@pytest.fixture(scope="module")
def gateway(
    module_broker_url: str, module_log_dir: Path, sim_workers: list[WorkerProcess]
) -> Iterator[Gateway]:
    with running_gateway(
        module_broker_url, module_log_dir, env={"CORRAL_MAX_PROMPT_BYTES": "4096"}
    ) as gw:
        wait_for_models(gw, {"sim-small"})
        yield gw
