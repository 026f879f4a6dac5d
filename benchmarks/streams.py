"""Many streams at once, and the asyncio client's time to first token next to the blocking one's.

1. Controller memory per in-flight stream: 500 jobs submitted and followed at once through the
   Python API against a simulated backend, in a fresh process per client (so one run's heap
   does not hide the other's). Blocking client: a thread per stream (that is how its API is
   used concurrently); asyncio client: one event loop. Per stream = (peak RSS while all are
   followed - RSS after warm-up) / streams.
2. Time to first token, interleaved: a direct simulated-backend call, the blocking client and
   the asyncio client; the difference from the direct call is what each path adds. Also how
   long one Celery publish holds whoever makes it (the blocking client's caller), and how long
   the asyncio client's publish holds its loop (Celery building the message; the write is
   awaited).

    python -m benchmarks.streams [--quick] [--streams 500] [--runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from benchmarks.ttft import direct_first_token_ms, percentile
from broker.schemas import AnyStreamEvent, DeltaEvent, DoneEvent, GenerationOptions, JobSpec
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.client import CorralClient, make_spec
from tests.support.servers import start_redis, start_worker, wait_until
from worker.backends.simulated import SimulatedBackend

FIRST_TOKEN_MS = 20.0


# --- memory per stream (runs in a child process) ------------------------------------------


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class _PeakSampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())


def _spec(i: int, tokens: int) -> JobSpec:
    return make_spec(f"stream {i}", options=GenerationOptions(max_tokens=tokens))


def memory_sync(url: str, streams: int, tokens: int) -> dict[str, float]:
    settings = build_settings(broker_url=url)
    with CorralClient(settings) as client:
        for i in range(5):  # warm: imports, pools, scripts
            list(client.stream(_spec(-i, 2)))
        baseline = _rss()
        held = threading.Barrier(streams + 1, timeout=300)
        failures: list[str] = []

        def follow(i: int) -> None:
            run = client.submit(_spec(i, tokens))
            events = run.events(timeout_s=120)
            first = next(events)
            held.wait()  # every stream is open before any is drained
            last = [first, *events][-1]
            if not isinstance(last, DoneEvent):
                failures.append(type(last).__name__)

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(streams)]
        with _PeakSampler() as sampler:
            for t in threads:
                t.start()
            # Counted before the barrier releases anyone: no stream has been drained yet.
            wait_until(lambda: held.n_waiting == streams, 300, "every stream to open")
            at_hold, threads_held = _rss(), threading.active_count()
            held.wait()
            for t in threads:
                t.join()
    return _memory_report(
        baseline, max(sampler.peak, at_hold), at_hold, streams, failures, threads_held
    )


def memory_async(url: str, streams: int, tokens: int) -> dict[str, float]:
    async def run() -> dict[str, float]:
        settings = build_settings(broker_url=url)
        async with AsyncCorralClient(settings) as client:
            for i in range(5):
                [e async for e in client.stream(_spec(-i, 2))]
            baseline = _rss()
            failures: list[str] = []
            with _PeakSampler() as sampler:
                runs = await asyncio.gather(
                    *(client.submit(_spec(i, tokens)) for i in range(streams))
                )
                iterators = [r.events(timeout_s=120) for r in runs]
                await asyncio.gather(*(anext(it) for it in iterators))
                at_hold, threads_held = _rss(), threading.active_count()

                async def drain(events: AsyncIterator[AnyStreamEvent]) -> None:
                    last = [e async for e in events][-1]
                    if not isinstance(last, DoneEvent):
                        failures.append(type(last).__name__)

                await asyncio.gather(*(drain(it) for it in iterators))
            return _memory_report(
                baseline, max(sampler.peak, at_hold), at_hold, streams, failures, threads_held
            )

    return asyncio.run(run())


def _memory_report(
    baseline: int, peak: int, at_hold: int, streams: int, failures: list[str], threads: int
) -> dict[str, float]:
    if failures:
        raise RuntimeError(f"{len(failures)} streams did not finish: {failures[:5]}")
    return {
        "baseline_mb": baseline / 2**20,
        "peak_mb": peak / 2**20,
        "per_stream_kb": (peak - baseline) / streams / 1024,
        "per_stream_at_hold_kb": (at_hold - baseline) / streams / 1024,
        "threads": threads,
    }


def measure_memory(kind: str, url: str, streams: int, tokens: int) -> dict[str, float]:
    """Runs in a fresh process: ``python -m benchmarks.streams --child KIND``."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.streams",
            "--child",
            kind,
            "--url",
            url,
            "--streams",
            str(streams),
            "--tokens",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory run {kind} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- time to first token ------------------------------------------------------------------


def sync_first_token_ms(client: CorralClient) -> float:
    started = time.perf_counter()
    run = client.submit(make_spec("benchmark", options=GenerationOptions(max_tokens=2)))
    first: float | None = None
    for event in run.events(timeout_s=30):
        if isinstance(event, DeltaEvent) and first is None:
            first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError("no token through the blocking client")
    return first


async def async_first_token_ms(client: AsyncCorralClient) -> float:
    started = time.perf_counter()
    run = await client.submit(make_spec("benchmark", options=GenerationOptions(max_tokens=2)))
    first: float | None = None
    async for event in run.events(timeout_s=30):
        if isinstance(event, DeltaEvent) and first is None:
            first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError("no token through the asyncio client")
    return first


def publish_hold_ms(client: CorralClient, runs: int) -> list[float]:
    """How long one Celery publish blocks its caller (a job for a node nobody serves)."""
    held: list[float] = []
    app = client.app
    for _ in range(runs):
        started = time.perf_counter()
        app.send_task(
            "corral.bench_noop", args=[], queue="corral.bench.unserved", ignore_result=True
        )
        held.append((time.perf_counter() - started) * 1000)
    client.redis.delete("corral.bench.unserved")
    return held


def loop_hold_ms(client: AsyncCorralClient, runs: int) -> list[float]:
    """How long the asyncio client's publish holds its loop: Celery building the message
    (``send_task``'s path to the write), the write itself being awaited."""
    held: list[float] = []
    builder = client._publisher.builder
    for _ in range(runs):
        started = time.perf_counter()
        builder.build("corral.bench_noop", args=[], queue="corral.bench.unserved")
        held.append((time.perf_counter() - started) * 1000)
    return held


def measure_ttft(url: str, runs: int) -> dict[str, list[float]]:
    settings = build_settings(broker_url=url)
    backend = SimulatedBackend(first_token_s=FIRST_TOKEN_MS / 1000, token_s=0.001)
    loop = asyncio.new_event_loop()
    paths: dict[str, list[float]] = {
        "direct": [],
        "sync": [],
        "async": [],
    }
    try:
        aclient = AsyncCorralClient(settings)
        with CorralClient(settings) as client:
            for _ in range(10):  # warm every path: pools, imports, scripts
                sync_first_token_ms(client)
                loop.run_until_complete(async_first_token_ms(aclient))
                loop.run_until_complete(direct_first_token_ms(backend))
            for _ in range(runs):
                paths["direct"].append(loop.run_until_complete(direct_first_token_ms(backend)))
                paths["sync"].append(sync_first_token_ms(client))
                paths["async"].append(loop.run_until_complete(async_first_token_ms(aclient)))
            paths["publish hold"] = publish_hold_ms(client, runs)
            paths["loop hold"] = loop_hold_ms(aclient, runs)
        loop.run_until_complete(aclient.aclose())
    finally:
        loop.close()
    return paths


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs: under a minute")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per stream (memory)")
    parser.add_argument("--child", choices=["sync", "async"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        measure = memory_sync if args.child == "sync" else memory_async
        print(json.dumps(measure(args.url, args.streams, args.tokens)))
        return 0

    runs, tokens = (30, 4) if args.quick else (args.runs, args.tokens)
    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    workers = []
    try:
        # Memory: one node serving 64 at a time, ~100 ms per token, so every stream is in
        # flight (running or queued) while the streams are held. (64: the worker's own Redis
        # pool, redis-py's default of 100, runs out near 100 concurrent jobs.)
        workers.append(
            start_worker(
                redis_server.url,
                "wide",
                "--simulate",
                "--sim-first-token-ms",
                "10",
                "--sim-token-ms",
                "100",
                "--capacity",
                "64",
                log_dir=log_dir,
                heartbeat_s=2.0,
            )
        )
        with CorralClient(build_settings(broker_url=redis_server.url)) as probe:
            wait_until(lambda: any(n.up for n in probe.nodes()), 15, "the worker")
        memory = {
            kind: measure_memory(kind, redis_server.url, args.streams, tokens)
            for kind in ("sync", "async")
        }
        workers.pop().stop()
        # Time to first token: one node, one job at a time, as benchmarks/ttft.py.
        workers.append(
            start_worker(
                redis_server.url,
                "bench",
                "--simulate",
                "--sim-first-token-ms",
                str(FIRST_TOKEN_MS),
                "--sim-token-ms",
                "1",
                log_dir=log_dir,
                heartbeat_s=2.0,
            )
        )
        with CorralClient(build_settings(broker_url=redis_server.url)) as probe:
            wait_until(
                lambda: [n.name for n in probe.nodes() if n.up] == ["bench"], 15, "the worker"
            )
        ttft = measure_ttft(redis_server.url, runs)
    finally:
        for worker in workers:
            worker.stop()
        redis_server.stop()

    console = Console()
    table = Table(title=f"{args.streams} concurrent streams through the Python API")
    columns = ("client", "RSS after warm-up MB", "peak MB", "per stream KB", "threads held")
    for column in columns:
        table.add_column(column, justify="right" if column != "client" else "left")
    for kind, label in (("sync", "CorralClient (a thread each)"), ("async", "AsyncCorralClient")):
        m = memory[kind]
        table.add_row(
            label,
            f"{m['baseline_mb']:.1f}",
            f"{m['peak_mb']:.1f}",
            f"{m['per_stream_kb']:.1f}",
            f"{m['threads']:.0f}",
        )
    console.print(table)

    direct = ttft["direct"]
    table = Table(
        title=f"time to first token, {runs} interleaved runs, simulated first token "
        f"{FIRST_TOKEN_MS:.0f} ms"
    )
    for column in ("path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for label, values in ttft.items():
        if label in ("publish hold", "loop hold"):
            continue
        added = [v - d for v, d in zip(values, direct, strict=True)]
        table.add_row(
            label,
            f"{percentile(values, 50):.2f}",
            f"{percentile(values, 99):.2f}",
            "" if label == "direct" else f"{percentile(added, 50):.2f}",
            "" if label == "direct" else f"{percentile(added, 99):.2f}",
        )
    console.print(table)
    hold = ttft["publish hold"]
    console.print(
        f"one Celery publish holds its caller p50 {percentile(hold, 50):.2f} ms, "
        f"p99 {percentile(hold, 99):.2f} ms, mean {statistics.fmean(hold):.2f} ms"
    )
    hold = ttft["loop hold"]
    console.print(
        f"the asyncio client's publish holds its loop p50 {percentile(hold, 50):.2f} ms, "
        f"p99 {percentile(hold, 99):.2f} ms, mean {statistics.fmean(hold):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
