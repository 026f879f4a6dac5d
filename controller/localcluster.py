"""A throwaway cluster on this machine: a broker and node workers as child processes.

Used by ``corral demo``. The broker is redis-server from PATH on a free port; without one, an
embedded fakeredis TCP server stands in (with a warning: it is for trying corral, not for use).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import redis

from broker.errors import BrokerUnavailable
from broker.redis_clients import sync_client

OLLAMA_DEFAULT_URL = "http://127.0.0.1:11434"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ollama_answers(url: str = OLLAMA_DEFAULT_URL) -> bool:
    """Whether a real Ollama is serving at ``url`` (and has at least one model)."""
    try:
        response = httpx.get(f"{url}/api/tags", timeout=0.5)
        return response.status_code == 200 and bool(response.json().get("models"))
    except (httpx.HTTPError, ValueError):
        return False


def _wait_for_ping(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = sync_client(url, max_connections=1, socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    raise BrokerUnavailable(f"the local broker at {url} did not answer within {timeout_s:.0f}s")


def redis_server_command(
    binary: str, port: int, workdir: Path, *, appendonly: bool = False
) -> list[str]:
    """redis-server on loopback only, keeping nothing on disk unless ``appendonly``."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(workdir / "redis.log"),
    ]


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 15
) -> int:
    """Signal a child, wait for it, kill it if it will not go; returns its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


@dataclass
class LocalBroker:
    url: str
    embedded: bool
    _stop: list[object] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        for stopper in reversed(self._stop):
            stopper()  # type: ignore[operator]


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[LocalBroker]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    binary = shutil.which("redis-server")
    if binary is not None:
        process = subprocess.Popen(
            redis_server_command(binary, port, workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        broker = LocalBroker(url, embedded=False)
        broker._stop.append(lambda: stop_process(process))
    else:
        broker = _embedded_broker(port, url)
    try:
        _wait_for_ping(url, 10)
        yield broker
    finally:
        broker.stop()


def _embedded_broker(port: int, url: str) -> LocalBroker:
    try:
        from fakeredis import TcpFakeServer  # noqa: PLC0415 - optional, only without redis-server
    except ImportError:
        raise BrokerUnavailable(
            "no redis-server on PATH and fakeredis is not installed: "
            "`sudo apt-get install redis-server` or `pip install 'corral[embedded]'`"
        ) from None
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True)
    thread.start()
    broker = LocalBroker(url, embedded=True)

    def stop_server() -> None:
        server.shutdown()
        server.server_close()

    broker._stop.append(stop_server)
    return broker


@dataclass
class LocalWorker:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def stop(self) -> None:
        stop_process(self.process)
        self.log_file.close()


def start_local_worker(broker_url: str, name: str, args: list[str], workdir: Path) -> LocalWorker:
    log_path = workdir / f"worker-{name}.log"
    log_file = log_path.open("wb")
    env = {**os.environ, "CORRAL_BROKER_URL": broker_url, "CORRAL_HEARTBEAT_INTERVAL_S": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--name", name, *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return LocalWorker(name, process, log_path, log_file)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="corral-demo-"))
