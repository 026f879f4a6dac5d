"""Starting real redis-server and corral worker processes for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from controller.localcluster import free_port, redis_server_command, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: object, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    password: str | None = None
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_process(self.process, timeout_s=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def halt(self) -> None:
        """Stop the server as an operator would (SIGTERM: it flushes its AOF), keeping its
        files for ``resume``."""
        stop_process(self.process, timeout_s=10)

    def resume(self) -> None:
        """Start it again on the same port from the same files."""
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_answering(self)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False


def start_redis(
    password: str | None = None,
    appendonly: bool = False,
    bind: str | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: run `make test`, which installs it")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="corral-redis-"))
    args = [
        *redis_server_command(binary, port, workdir, appendonly=appendonly),
        # One database per test module or test: a fresh namespace without a new server.
        "--databases",
        "256",
    ]
    if password:
        args += ["--requirepass", password]
    if bind:
        args += ["--bind", bind]  # the later --bind wins over the loopback-only default
    args += extra_args
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, process, workdir, password, args)
    try:
        _wait_answering(server)
    except TimeoutError:
        server.stop()
        raise
    return server


def _wait_answering(server: RedisServer) -> None:
    wait_until(server.answers, 10, "redis-server to answer")


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def freeze(self) -> None:
        """SIGSTOP: the process stays, but sends no heartbeat and writes nothing (a hung
        machine, a laptop lid closed)."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        code = stop_process(self.process, sig, timeout_s)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return code


def start_sim_fleet(
    broker_url: str,
    *args: str,
    heartbeat_s: float = 0.5,
    log_dir: Path,
    ready_timeout_s: float = 60,
) -> WorkerProcess:
    """``python -m worker.sim ARGS`` (``corral sim``): a simulated fleet in one process."""
    return start_worker(
        broker_url,
        "fleet",
        *args,
        heartbeat_s=heartbeat_s,
        log_dir=log_dir,
        module="worker.sim",
        ready_timeout_s=ready_timeout_s,
    )


def start_worker(
    broker_url: str,
    name: str,
    *args: str,
    heartbeat_s: float = 0.5,
    log_dir: Path,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
    module: str = "worker",
    ready_timeout_s: float = 30,
) -> WorkerProcess:
    """``python -m worker --name NAME ARGS`` in its own process, logging to a file.

    ``module="worker.sim"`` starts a simulated fleet instead (it takes no ``--name``)."""
    log_path = log_dir / f"worker-{name}-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in WorkerProcess.stop
    # The test process's own CORRAL_CONFIG is dropped; one passed in ``env`` is kept.
    inherited = {k: v for k, v in os.environ.items() if k != "CORRAL_CONFIG"}
    full_env = {
        **inherited,
        "CORRAL_BROKER_URL": broker_url,
        "CORRAL_HEARTBEAT_INTERVAL_S": str(heartbeat_s),
        **(env or {}),
    }
    naming = ["--name", name] if module == "worker" else []
    process = subprocess.Popen(
        [*command_prefix, sys.executable, "-m", module, *naming, *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=REPO_ROOT,
    )
    worker = WorkerProcess(name, process, log_path, log_file)
    if wait_ready:
        try:
            wait_until(
                lambda: "ready." in worker.log() or process.poll() is not None,
                ready_timeout_s,
                f"worker {name} to be ready",
            )
        except TimeoutError:
            worker.stop()
            raise
        if process.poll() is not None:
            log = worker.log()
            worker.stop()  # closes its log file
            raise RuntimeError(f"worker {name} exited early:\n{log}")
    return worker


@contextlib.contextmanager
def running_workers(
    broker_url: str,
    log_dir: Path,
    *specs: tuple[str, list[str]],
    env: dict[str, str] | None = None,
) -> Iterator[list[WorkerProcess]]:
    workers: list[WorkerProcess] = []
    try:
        for name, args in specs:
            workers.append(start_worker(broker_url, name, *args, log_dir=log_dir, env=env))
        yield workers
    finally:
        for w in workers:
            w.stop()


class Supervisor:
    """Restarts workers that die, as systemd's Restart=always would on a real node."""

    def __init__(self, broker_url: str, log_dir: Path, specs: list[tuple[str, list[str]]]):
        self._broker_url = broker_url
        self._log_dir = log_dir
        self._specs = dict(specs)
        self.workers = {
            name: start_worker(broker_url, name, *args, log_dir=log_dir) for name, args in specs
        }
        self.restarts: dict[str, int] = dict.fromkeys(self._specs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            for name, worker in list(self.workers.items()):
                if worker.process.poll() is not None and not self._stop.is_set():
                    worker.stop()
                    self.restarts[name] += 1
                    self.workers[name] = start_worker(
                        self._broker_url, name, *self._specs[name], log_dir=self._log_dir
                    )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for worker in self.workers.values():
            worker.stop()


@contextlib.contextmanager
def supervised_workers(
    broker_url: str, log_dir: Path, *specs: tuple[str, list[str]]
) -> Iterator[Supervisor]:
    supervisor = Supervisor(broker_url, log_dir, list(specs))
    try:
        yield supervisor
    finally:
        supervisor.stop()
