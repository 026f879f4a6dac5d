"""A soak: steady load on four simulated nodes with a fault every so often, counting every job.

Four clients send jobs back to back (each job may restart elsewhere if its node fails mid-answer:
``retry_partial``) while a fault strikes every ``--every`` seconds, in turn: a node killed and
restarted (as systemd would), a node frozen for 8 s, a node cut off from Redis for 8 s (a network
namespace; skipped where one cannot be made), and Redis restarted (with AOF). Every job ends as
done (first try), moved (done after a reroute), interrupted, failed (a final error with its
reason) or lost (no end within the job timeout). The target is zero lost and flat memory.

    python -m benchmarks.soak [--minutes 30] [--every 120] [--quick]   # --quick: 3 min, every 30 s
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from broker.errors import CorralError, JobTimeout
from broker.schemas import DoneEvent, ErrorEvent, InterruptedEvent, ReroutedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.support.netns import NamespacedHost, namespaced_host, why_namespaces_cannot_be_made
from tests.support.servers import RedisServer, WorkerProcess, start_redis, start_worker

NODES = ("a", "b", "c", "d")
CLIENTS = 4
JOB_TIMEOUT_S = 60.0
PASSWORD = "soak-benchmark"
SIM = ["--simulate", "--sim-first-token-ms", "50", "--sim-token-ms", "40", "--capacity", "2"]


class Fleet:
    def __init__(self, server: RedisServer, host: NamespacedHost | None, logs: Path) -> None:
        self.server, self.host, self.logs = server, host, logs
        self.workers: dict[str, WorkerProcess] = {}
        for name in NODES:
            self.start(name)

    def start(self, name: str) -> None:
        behind = self.host is not None and name == "d"  # d sits behind the namespace's link
        url = self.server.url
        if behind and self.host is not None:
            url = f"redis://:{PASSWORD}@{self.host.host_address}:{self.server.port}/0"
        prefix = self.host.command_prefix() if behind and self.host is not None else []
        self.workers[name] = start_worker(
            url, name, *SIM, log_dir=self.logs, heartbeat_s=2.0, command_prefix=prefix
        )

    def rss_mb(self) -> dict[str, float]:
        return {
            n: psutil.Process(w.process.pid).memory_info().rss / 2**20
            for n, w in self.workers.items()
            if w.process.poll() is None
        }


REDIS = "redis"


def sample_memory(fleet: Fleet, admin: redis.Redis) -> dict[str, float]:
    """Resident MB of each worker and this (the controller's) process, and Redis's own
    ``used_memory``, at one moment."""
    sample = fleet.rss_mb()
    sample["controller"] = psutil.Process().memory_info().rss / 2**20
    sample[REDIS] = int(admin.info("memory")["used_memory"]) / 2**20
    return sample


def faults(fleet: Fleet) -> list[tuple[str, Callable[[], None]]]:
    def kill() -> None:
        fleet.workers["a"].stop(signal.SIGKILL)
        fleet.start("a")

    def freeze() -> None:
        fleet.workers["b"].freeze()
        time.sleep(8)
        fleet.workers["b"].thaw()

    def partition() -> None:
        assert fleet.host is not None
        fleet.host.cut()
        time.sleep(8)
        fleet.host.heal()

    def restart_redis() -> None:
        fleet.server.halt()
        time.sleep(1)
        fleet.server.resume()

    chosen = [("kill a", kill), ("freeze b", freeze)]
    if fleet.host is not None:
        chosen.append(("partition d", partition))
    return [*chosen, ("restart Redis", restart_redis)]


def run_one(client: CorralClient, index: int) -> str:
    try:
        run = client.submit(make_spec(f"soak {index}", retry_partial=True))
        events = list(run.events(timeout_s=JOB_TIMEOUT_S))
    except JobTimeout:
        return "lost"
    except CorralError:
        return "failed"
    last = events[-1] if events else None
    if isinstance(last, DoneEvent):
        return "moved" if any(isinstance(e, ReroutedEvent) for e in events) else "done"
    if isinstance(last, InterruptedEvent):
        return "interrupted"
    if isinstance(last, ErrorEvent):
        return "failed"
    return "lost"


@contextlib.contextmanager
def maybe_host() -> Iterator[NamespacedHost | None]:
    if why_namespaces_cannot_be_made() is not None:
        yield None
        return
    with namespaced_host() as host:
        yield host


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=float, default=120, help="seconds between faults")
    parser.add_argument("--quick", action="store_true", help="3 minutes, a fault every 30 s")
    args = parser.parse_args()
    minutes, every = (3.0, 30.0) if args.quick else (args.minutes, args.every)
    console = Console()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    struck: list[str] = []
    with maybe_host() as host:
        bind = f"127.0.0.1 {host.host_address}" if host is not None else None
        server = start_redis(password=PASSWORD, appendonly=True, bind=bind)
        logs = Path(tempfile.mkdtemp(prefix="corral-soak-"))
        fleet = Fleet(server, host, logs)
        admin = server.client()
        settings = build_settings(broker_url=server.url, breaker_cooldown_s=5)
        try:
            with CorralClient(settings) as client:
                time.sleep(3)
                samples = [sample_memory(fleet, admin)]
                counter = iter(range(10**9))

                def load() -> None:
                    while not stop.is_set():
                        outcome = run_one(client, next(counter))
                        with lock:
                            outcomes[outcome] += 1

                threads = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
                for t in threads:
                    t.start()
                schedule = faults(fleet)
                deadline = time.monotonic() + minutes * 60
                with Progress(console=console) as progress:
                    task = progress.add_task("soak", total=minutes * 60)
                    next_fault = time.monotonic() + every
                    while (now := time.monotonic()) < deadline:
                        if now >= next_fault:
                            # Before each fault, after the last one's effects have settled.
                            samples.append(sample_memory(fleet, admin))
                            name, strike = schedule[len(struck) % len(schedule)]
                            struck.append(name)
                            strike()
                            next_fault = time.monotonic() + every
                        with lock:
                            summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
                        progress.update(
                            task,
                            completed=minutes * 60 - (deadline - time.monotonic()),
                            description=f"{summary or 'starting'} | faults: {len(struck)}",
                        )
                        time.sleep(1)
                stop.set()
                for t in threads:
                    t.join(JOB_TIMEOUT_S + 10)
                time.sleep(1)
                samples.append(sample_memory(fleet, admin))
        finally:
            for worker in fleet.workers.values():
                worker.stop()
            server.stop()

    table = Table(title=f"soak: {minutes:g} min, faults in turn every {every:g} s: {struck}")
    table.add_column("jobs")
    for kind in ("done", "moved", "interrupted", "failed", "lost"):
        table.add_column(kind, justify="right")
    table.add_row(
        str(sum(outcomes.values())),
        *(str(outcomes[k]) for k in ("done", "moved", "interrupted", "failed", "lost")),
    )
    console.print(table)
    # Flat means: what grows does so while warming up, not on and on. The middle sample splits
    # the run: growth in the second half is what a leak would keep adding.
    middle = samples[len(samples) // 2]
    memory = Table(title=f"memory (MB), {len(samples)} samples: start, middle, end")
    for column in ("process", "start", "middle", "end", "second half"):
        memory.add_column(column, justify="left" if column == "process" else "right")
    for name in (*NODES, "controller", REDIS):
        values = [samples[0].get(name), middle.get(name), samples[-1].get(name)]
        label = {"controller": "controller (4 client threads)", REDIS: "Redis used_memory"}.get(
            name, f"worker {name}"
        ) + (" (restarted)" if name == "a" and "kill a" in struck else "")
        half = (
            f"{values[2] - values[1]:+.1f}"
            if values[1] is not None and values[2] is not None
            else "-"
        )
        memory.add_row(label, *(f"{v:.1f}" if v else "-" for v in values), half)
    console.print(memory)
    return 1 if outcomes["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
