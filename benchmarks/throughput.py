"""Control-plane throughput with an instant backend: corral beside a plain Celery no-op.

One Redis, two single-slot workers started side by side (solo pool): a corral node fronting
the simulated backend with no delay (first token and every token at 0 ms, one token), and a
plain Celery worker whose task does nothing but an INCR (``benchmarks.celery_noop``). Each is
given the same number of jobs, in alternating rounds so machine noise hits both alike:

- plain Celery: ``send_task`` for every job, then wait until the worker has run them all;
- corral: every job through the asyncio Python API (route, subscribe, send, stream, done),
  ``--window`` in flight at once, until each job's ``done`` event has arrived.

Jobs per second over the round's wall time; the ratio is corral's share of Celery's rate.

    python -m benchmarks.throughput [--quick] [--jobs 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from benchmarks.celery_noop import DONE_COUNTER, NOOP_QUEUE, NOOP_TASK
from benchmarks.footprint import cpu_seconds
from broker.celery_app import make_celery_app
from broker.schemas import DoneEvent, GenerationOptions
from broker.settings import CorralSettings, build_settings
from controller.aclient import AsyncCorralClient
from controller.client import make_spec
from tests.support.servers import start_redis, start_worker


def celery_round(settings: CorralSettings, jobs: int) -> float:
    """Jobs per second through a plain Celery task."""
    url = settings.broker_url.get_secret_value()
    app = make_celery_app(settings)
    counter = redis.Redis.from_url(url)
    counter.set(DONE_COUNTER, 0)
    try:
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(jobs):
                app.send_task(NOOP_TASK, args=[i], queue=NOOP_QUEUE, producer=producer)
        while int(counter.get(DONE_COUNTER) or 0) < jobs:
            time.sleep(0.001)
        return jobs / (time.perf_counter() - started)
    finally:
        counter.close()
        app.close()


async def corral_round(client: AsyncCorralClient, jobs: int, window: int) -> float:
    """Jobs per second through corral's asyncio client, ``window`` jobs in flight."""
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            run = await client.submit(
                make_spec(f"job {i}", options=GenerationOptions(max_tokens=1))
            )
            last = None
            async for event in run.events(timeout_s=60):
                last = event
            if not isinstance(last, DoneEvent):
                raise RuntimeError(f"job {i} ended with {last!r}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    return jobs / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200 jobs, 2 rounds")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=16, help="corral jobs in flight at once")
    args = parser.parse_args()
    jobs, rounds = (200, 2) if args.quick else (args.jobs, args.rounds)

    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-throughput-"))
    settings = build_settings(broker_url=redis_server.url)
    corral_rates: list[float] = []
    celery_rates: list[float] = []
    # CPU milliseconds per job, summed over the rounds: where each path's time goes.
    cpu_ms = {
        key: 0.0 for key in ("celery client", "celery worker", "corral client", "corral worker")
    }
    try:
        node = start_worker(
            redis_server.url,
            "bench",
            "--simulate",
            "--sim-first-token-ms",
            "0",
            "--sim-token-ms",
            "0",
            "--capacity",
            "1",
            log_dir=log_dir,
            heartbeat_s=2.0,
        )
        noop = start_worker(
            redis_server.url, "noop", module="benchmarks.celery_noop", log_dir=log_dir
        )
        node_pid, noop_pid = node.process.pid, noop.process.pid
        try:

            async def corral_rounds() -> None:
                async with AsyncCorralClient(settings) as client:
                    nodes = await client.nodes()
                    if not any(n.up for n in nodes):
                        raise RuntimeError("the corral node is not up")
                    await corral_round(client, 20, args.window)  # warm pools and scripts
                    celery_round(settings, 20)
                    for _ in range(rounds):
                        client_cpu, worker_cpu = time.process_time(), cpu_seconds(noop_pid)
                        celery_rates.append(celery_round(settings, jobs))
                        cpu_ms["celery client"] += time.process_time() - client_cpu
                        cpu_ms["celery worker"] += cpu_seconds(noop_pid) - worker_cpu
                        client_cpu, worker_cpu = time.process_time(), cpu_seconds(node_pid)
                        corral_rates.append(await corral_round(client, jobs, args.window))
                        cpu_ms["corral client"] += time.process_time() - client_cpu
                        cpu_ms["corral worker"] += cpu_seconds(node_pid) - worker_cpu

            asyncio.run(corral_rounds())
        finally:
            noop.stop()
            node.stop()
    finally:
        redis_server.stop()

    table = Table(
        title=f"throughput, instant backend, {rounds} alternating rounds of {jobs} jobs, "
        "one solo-pool worker each"
    )
    for column in (
        "path",
        "jobs/s (median)",
        "wall ms per job",
        "client CPU ms per job",
        "worker CPU ms per job",
        "rounds",
    ):
        table.add_column(column, justify="left" if column == "path" else "right")
    for label, key, rates in (
        ("plain Celery no-op task", "celery", celery_rates),
        ("corral job", "corral", corral_rates),
    ):
        median = statistics.median(rates)
        table.add_row(
            label,
            f"{median:.0f}",
            f"{1000 / median:.2f}",
            f"{1000 * cpu_ms[f'{key} client'] / (jobs * rounds):.2f}",
            f"{1000 * cpu_ms[f'{key} worker'] / (jobs * rounds):.2f}",
            ", ".join(f"{r:.0f}" for r in rates),
        )
    ratio = statistics.median(corral_rates) / statistics.median(celery_rates)
    table.add_row("corral / Celery", f"{ratio:.2f}x", "", "", "", "")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
