"""The HTTP gateway against the Python API, on the simulated backend.

1. Added time to first token: a direct call of the same simulated backend (in this process),
   the same short job through the asyncio Python API (in this process), through the gateway's
   OpenAI path (``/v1/chat/completions``, SSE) and its Ollama path (``/api/chat``, NDJSON),
   interleaved in one run (in a shuffled order each round, each request after a short pause)
   so machine noise hits them alike.
2. Load: N streaming OpenAI requests from C concurrent clients: requests/s, tokens/s, p50/p99
   of the whole request.
3. Gateway memory per open stream: RSS with S streams held open (a slow node) minus at rest.

    python -m benchmarks.gateway [--quick] [--runs 200] [--requests 200] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks.ttft import direct_first_token_ms
from broker.schemas import DeltaEvent, GenerationOptions
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.client import make_spec
from controller.localcluster import free_port, stop_process
from tests.support.servers import REPO_ROOT, start_redis, start_worker
from worker.backends.simulated import SimulatedBackend

MESSAGES = [{"role": "user", "content": "benchmark"}]


MAX_WORKER_CAPACITY = 256
"""The most job slots ``corral worker --capacity`` takes."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def python_api_ms(client: AsyncCorralClient) -> float:
    started = time.perf_counter()
    run = await client.submit(
        make_spec("benchmark", node="fast", options=GenerationOptions(max_tokens=2))
    )
    first: float | None = None
    async for event in run.events(30):
        if isinstance(event, DeltaEvent) and first is None:
            first = (time.perf_counter() - started) * 1000
    assert first is not None
    return first


async def http_first_token_ms(http: httpx.AsyncClient, path: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", path, json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if first is None and line.strip():
                first = (time.perf_counter() - started) * 1000
    assert first is not None
    return first


OPENAI_BODY = {"model": "@fast", "messages": MESSAGES, "stream": True, "max_tokens": 2}
OLLAMA_BODY = {"model": "@fast", "messages": MESSAGES, "options": {"num_predict": 2}}


SETTLE_S = 0.02
"""The pause before each measured request: longer than a job's after-steps here."""

DIRECT = "direct backend call"
PYTHON_API = "Python API (asyncio)"


async def measure_ttft(
    url: str, broker_url: str, runs: int, first_token_ms: float
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        DIRECT: [],
        PYTHON_API: [],
        "OpenAI path": [],
        "Ollama path": [],
    }
    # The workers' backend, called here: what a client talking to it straight would see.
    backend = SimulatedBackend(first_token_s=first_token_ms / 1000, token_s=0.001)
    async with (
        AsyncCorralClient(build_settings(broker_url=broker_url)) as client,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        paths = {
            DIRECT: lambda: direct_first_token_ms(backend),
            PYTHON_API: lambda: python_api_ms(client),
            "OpenAI path": lambda: http_first_token_ms(http, "/v1/chat/completions", OPENAI_BODY),
            "Ollama path": lambda: http_first_token_ms(http, "/api/chat", OLLAMA_BODY),
        }
        order = list(paths)
        shuffle = random.Random(9)
        for warm in range(runs + 10):
            # Each request starts once the last one's after-steps (its worker's result and
            # ack, the gateway's clean-up) are over, and the order is shuffled every round:
            # turning it kept each path behind the same other one, and the path right behind
            # the Python API job paid for that job's tail (about 0.5 ms: swapping the two
            # gateway paths swapped which of them was slower).
            shuffle.shuffle(order)
            measured: dict[str, float] = {}
            for label in order:
                await asyncio.sleep(SETTLE_S)
                measured[label] = await paths[label]()
            if warm >= 10:
                for label, value in measured.items():
                    results[label].append(value)
    return results


async def measure_load(url: str, requests: int, clients: int) -> dict[str, float]:
    body = {"model": "@fast", "messages": MESSAGES, "stream": True}
    durations: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def one() -> None:
            nonlocal tokens
            async with gate:
                started = time.perf_counter()
                async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                    answer.raise_for_status()
                    async for line in answer.aiter_lines():
                        if '"content"' in line:
                            tokens += 1
                durations.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        elapsed = time.perf_counter() - started
    return {
        "requests/s": requests / elapsed,
        "tokens/s": tokens / elapsed,
        "p50 ms": percentile(durations, 50),
        "p99 ms": percentile(durations, 99),
    }


async def measure_memory(url: str, gateway_pid: int, streams: int) -> tuple[float, float]:
    """(RSS at rest MiB, KiB per open stream)."""
    process = psutil.Process(gateway_pid)
    rest = process.memory_info().rss
    body = {"model": "sim-small", "messages": MESSAGES, "stream": True}
    slow = {"X-Corral-Tags": "slow"}
    opened = asyncio.Event()
    release = asyncio.Event()
    first_seen = 0
    limits = httpx.Limits(max_connections=streams + 4)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def hold() -> None:
            nonlocal first_seen
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=slow
            ) as answer:
                async for _line in answer.aiter_lines():
                    first_seen += 1
                    if first_seen == streams:
                        opened.set()
                    await release.wait()
                    return  # closing it cancels the job

        tasks = [asyncio.create_task(hold()) for _ in range(streams)]
        await asyncio.wait_for(opened.wait(), 120)
        held = process.memory_info().rss
        release.set()
        await asyncio.gather(*tasks)
    return rest / 2**20, (held - rest) / 1024 / streams


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs: under a minute")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    args = parser.parse_args()
    if args.quick:
        args.runs = 30

    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-bench-gateway-"))
    sim = ["--simulate", "--sim-first-token-ms", str(args.first_token_ms), "--heartbeat", "2"]
    capacity = str(max(args.clients, 1))
    workers = [
        start_worker(
            redis_server.url,
            "fast",
            *sim,
            "--sim-token-ms",
            "1",
            "--capacity",
            capacity,
            log_dir=log_dir,
        ),
    ]
    # The streams held open for the memory figure go to "slow" workers (a worker takes at most
    # 256 jobs at once, so 500 streams need two).
    slow_workers = -(-args.streams // MAX_WORKER_CAPACITY)
    workers += [
        start_worker(
            redis_server.url,
            f"slow{i}",
            *sim,
            "--sim-token-ms",
            "500",
            "--tags",
            "slow",
            "--capacity",
            str(-(-args.streams // slow_workers)),
            log_dir=log_dir,
        )
        for i in range(slow_workers)
    ]
    port = free_port()
    env = {**os.environ, "CORRAL_BROKER_URL": redis_server.url}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "controller.gateway", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(log_dir / "gateway.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    console = Console(stderr=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/v1/models").json()["data"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway never listed a model")
            time.sleep(0.1)
        console.print(f"time to first token, {args.runs} interleaved runs ...")
        ttft = asyncio.run(measure_ttft(url, redis_server.url, args.runs, args.first_token_ms))
        console.print(f"load: {args.requests} streams from {args.clients} clients ...")
        load = asyncio.run(measure_load(url, args.requests, args.clients))
        console.print(f"memory: {args.streams} open streams ...")
        rest_mib, per_stream_kib = asyncio.run(measure_memory(url, gateway.pid, args.streams))
    finally:
        stop_process(gateway, timeout_s=10)
        for worker in workers:
            worker.stop()
        redis_server.stop()

    table = Table(
        title=f"time to first token, {args.runs} interleaved runs, simulated first token "
        f"{args.first_token_ms:.0f} ms"
    )
    columns = ("path", "p50 ms", "p99 ms", "added p50 / p99 ms", "over the Python API p50 ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    direct, api = ttft[DIRECT], ttft[PYTHON_API]
    for label, values in ttft.items():
        added = [v - d for v, d in zip(values, direct, strict=True)]
        over_api = [v - a for v, a in zip(values, api, strict=True)]
        table.add_row(
            label,
            f"{percentile(values, 50):.2f}",
            f"{percentile(values, 99):.2f}",
            "" if label == DIRECT else f"{percentile(added, 50):.2f} / {percentile(added, 99):.2f}",
            "" if label in (DIRECT, PYTHON_API) else f"{percentile(over_api, 50):.2f}",
        )
    Console().print(table)
    load_table = Table(title=f"{args.requests} streaming requests from {args.clients} clients")
    for column in load:
        load_table.add_column(column, justify="right")
    load_table.add_row(*(f"{v:.1f}" for v in load.values()))
    Console().print(load_table)
    Console().print(
        f"gateway memory: {rest_mib:.1f} MiB at rest, {per_stream_kib:.1f} KiB per open stream"
        f" ({args.streams} held open)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
