"""Time to first token: a direct simulated-backend call vs the same job through corral.

Both are measured interleaved in one run, so machine noise hits them alike. The corral path is
the Python API in a warm process (no process start-up): route (reads the node list), subscribe,
send the Celery task, worker picks it up, calls the backend, publishes the first token, the
client receives it. The difference is what corral adds.

    python -m benchmarks.ttft [--runs 300] [--first-token-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from broker.schemas import ChatMessage, DeltaEvent, GenerationOptions
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.support.servers import start_redis, start_worker, wait_until
from worker.backends.simulated import SimulatedBackend


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def direct_first_token_ms(backend: SimulatedBackend) -> float:
    messages = [ChatMessage(role="user", content="benchmark")]
    started = time.perf_counter()
    stream = backend.stream_chat("sim-small", messages, GenerationOptions(max_tokens=2))
    async for chunk in stream:
        if chunk.text:
            elapsed = (time.perf_counter() - started) * 1000
            await stream.aclose()  # type: ignore[attr-defined]
            return elapsed
    raise RuntimeError("no token")


def corral_first_token_ms(client: CorralClient) -> float:
    started = time.perf_counter()
    submission = client.submit(make_spec("benchmark", options=GenerationOptions(max_tokens=2)))
    first: float | None = None
    for event in submission.events(timeout_s=30):
        if isinstance(event, DeltaEvent) and first is None:
            first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError("no token through corral")
    return first


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    parser.add_argument(
        "--capacity",
        type=int,
        default=1,
        help="the worker's parallel jobs: 1 runs jobs in Celery's solo pool, more in threads",
    )
    parser.add_argument(
        "--task-events",
        choices=["on", "off"],
        default="off",
        help="Celery task events: off is corral's default; Flower turns them on while it runs",
    )
    args = parser.parse_args()

    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    events_env = {"CORRAL_TASK_EVENTS": "true" if args.task_events == "on" else "false"}
    worker = start_worker(
        redis_server.url,
        "bench",
        "--simulate",
        "--sim-first-token-ms",
        str(args.first_token_ms),
        "--sim-token-ms",
        "1",
        "--capacity",
        str(args.capacity),
        log_dir=log_dir,
        heartbeat_s=2.0,
        env=events_env,
    )
    backend = SimulatedBackend(first_token_s=args.first_token_ms / 1000, token_s=0.001)
    direct: list[float] = []
    through: list[float] = []
    loop = asyncio.new_event_loop()
    try:
        settings = build_settings(broker_url=redis_server.url, task_events=args.task_events == "on")
        with CorralClient(settings) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 10, "the worker")
            for _ in range(10):  # warm both paths: connection pools, imports, caches
                corral_first_token_ms(client)
                loop.run_until_complete(direct_first_token_ms(backend))
            for _ in track(range(args.runs), description="measuring", console=Console(stderr=True)):
                direct.append(loop.run_until_complete(direct_first_token_ms(backend)))
                through.append(corral_first_token_ms(client))
    finally:
        loop.close()
        worker.stop()
        redis_server.stop()

    added = [t - d for t, d in zip(through, direct, strict=True)]
    table = Table(
        title=f"time to first token, {args.runs} interleaved runs, simulated first token "
        f"{args.first_token_ms:.0f} ms, capacity {args.capacity}, task events {args.task_events}"
    )
    for column in ("path", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for label, values in (("direct backend call", direct), ("through corral", through)):
        table.add_row(
            label,
            f"{percentile(values, 50):.2f}",
            f"{percentile(values, 99):.2f}",
            f"{statistics.fmean(values):.2f}",
        )
    table.add_row(
        "added by corral (p50 / p99 of the difference)",
        f"{percentile(added, 50):.2f}",
        f"{percentile(added, 99):.2f}",
        f"{statistics.fmean(added):.2f}",
    )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
