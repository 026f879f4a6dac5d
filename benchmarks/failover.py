"""How long a job waits when its node dies: from the kill to the job starting on another node.

Two simulated nodes at the default heartbeat. Each run sends a job to node ``a`` (its first
token is far away), kills ``a`` at a random moment of its heartbeat cycle, and times the steps
the user sees: the ``rerouted`` event, then ``started`` on ``b``. Half the runs kill with
SIGKILL (a crash), half freeze with SIGSTOP (a hung machine: the process is still there). The
README states the bound this checks: 3 heartbeats + one idle check.

    python -m benchmarks.failover [--runs 12] [--heartbeat 2]
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from benchmarks.ttft import percentile
from broker.schemas import ReroutedEvent, StartedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.reader import IDLE_CHECK_S
from tests.support.servers import WorkerProcess, start_redis, start_worker, wait_until


def one_run(
    client: CorralClient, workers: dict[str, WorkerProcess], how: signal.Signals, heartbeat_s: float
) -> tuple[str, float, float]:
    """Kill whichever node starts the job; seconds from the kill to ``rerouted`` and to
    ``started`` on the other node."""
    run = client.submit(make_spec("benchmark"))
    events = run.events(timeout_s=60)
    first = next(events)
    if not isinstance(first, StartedEvent):
        raise RuntimeError(f"expected the job to start, got {first}")
    time.sleep(random.uniform(0, heartbeat_s))
    workers[first.node].process.send_signal(how)
    killed_at = time.monotonic()
    moved = started = float("nan")
    for event in events:
        if isinstance(event, ReroutedEvent):
            moved = time.monotonic() - killed_at
        elif isinstance(event, StartedEvent):
            started = time.monotonic() - killed_at
            break
    run.reader.close()
    client.cancel(run.job_id)
    return first.node, moved, started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    args = parser.parse_args()

    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    slow = ["--simulate", "--sim-first-token-ms", "600000"]
    results: dict[str, list[tuple[float, float]]] = {"SIGKILL": [], "SIGSTOP": []}

    def start(name: str) -> WorkerProcess:
        return start_worker(
            redis_server.url, name, *slow, log_dir=log_dir, heartbeat_s=args.heartbeat
        )

    workers = {name: start(name) for name in ("a", "b")}
    console = Console(stderr=True)
    try:
        # Killing the same two nodes again and again would open their circuit breakers
        # (that is their job); this measures detection, so they stay closed.
        settings = build_settings(broker_url=redis_server.url, breaker_threshold=10_000)
        with CorralClient(settings) as client:
            for index in track(range(args.runs), description="killing", console=console):
                how = signal.SIGKILL if index % 2 == 0 else signal.SIGSTOP
                wait_until(lambda: sum(n.up for n in client.nodes()) == 2, 30, "both nodes up")
                victim, moved, started = one_run(client, workers, how, args.heartbeat)
                results[how.name].append((moved, started))
                # A new process under the same name replaces the dead one's liveness key.
                workers[victim].stop(signal.SIGKILL)
                workers[victim] = start(victim)
    finally:
        for worker in workers.values():
            worker.stop()
        redis_server.stop()

    bound = 3 * args.heartbeat + IDLE_CHECK_S
    table = Table(
        title=f"from a node's death to its job starting elsewhere, heartbeat {args.heartbeat:g} s, "
        f"stated bound {bound:.1f} s (+ the time to send)"
    )
    for column in ("how it died", "runs", "rerouted p50 s", "rerouted max s", "started max s"):
        table.add_column(column, justify="left" if column == "how it died" else "right")
    for how, values in results.items():
        if not values:
            continue
        moved = [m for m, _ in values]
        started = [s for _, s in values]
        table.add_row(
            how,
            str(len(values)),
            f"{percentile(moved, 50):.2f}",
            f"{max(moved):.2f}",
            f"{max(started):.2f}",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
