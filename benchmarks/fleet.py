"""A simulated fleet (``corral sim``) on a real Redis: heartbeat traffic, Redis memory and the
controller's cluster read at 10, 100 and 200 nodes; time to first token at 2 vs 200 nodes.

Per fleet size: Redis's input bytes per second while the fleet idles (heartbeats, plus the
fleet's Celery consumer waiting on every queue), the bytes one node's heartbeat stores (its
whole NodeInfo and its per-beat load), Redis's memory per node, and one cluster read by the
controller: the first (every inventory parsed) and the next ones (loads only, inventories kept).
Then the added time to first token: a job's first token through corral (route, subscribe,
send, claim, stream) minus the serving node's own simulated first-token time, with a 2-node and
a 200-node fleet running at once and taking turns job by job.

    python -m benchmarks.fleet [--quick] [--models-per-node 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from broker import names
from broker.schemas import DeltaEvent, GenerationOptions
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.cluster import ClusterReader, read_cluster
from tests.support.servers import (
    RedisServer,
    WorkerProcess,
    start_redis,
    start_sim_fleet,
    wait_until,
)
from worker.sim.profiles import fleet_profiles

HEARTBEAT_S = 2.0
FIRST_TOKEN_MS = 20.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def fleet_args(nodes: int, models: int) -> list[str]:
    return [
        f"--nodes={nodes}",
        f"--models-per-node={models}",
        "--slow=0",
        "--failing=0",
        f"--first-token-ms={FIRST_TOKEN_MS}",
        "--token-ms=1",
        "--loglevel=INFO",
    ]


def heartbeat_row(
    redis_server: RedisServer, nodes: int, models: int, window_s: float, log_dir: Path
) -> list[str]:
    db = redis_server.client()
    db.flushall()
    before = int(db.info("memory")["used_memory"])
    fleet = start_sim_fleet(
        redis_server.url, *fleet_args(nodes, models), heartbeat_s=HEARTBEAT_S, log_dir=log_dir
    )
    try:
        wait_until(lambda: db.hlen(names.NODE_LOADS_HASH) == nodes, 30, "every node's beat")
        time.sleep(HEARTBEAT_S)  # past the first, whole, beats
        start = int(db.info("stats")["total_net_input_bytes"])
        time.sleep(window_s)
        rate = (int(db.info("stats")["total_net_input_bytes"]) - start) / window_s
        memory = int(db.info("memory")["used_memory"]) - before
        whole = statistics.mean(db.hstrlen(names.NODES_HASH, n) for n in db.hkeys(names.NODES_HASH))
        load = statistics.mean(
            db.hstrlen(names.NODE_LOADS_HASH, n) for n in db.hkeys(names.NODE_LOADS_HASH)
        )
        fresh = []
        for _ in range(5):
            started = time.perf_counter()
            read_cluster(db)
            fresh.append((time.perf_counter() - started) * 1000)
        reader = ClusterReader()
        reader.read(db)
        kept = []
        for _ in range(20):
            started = time.perf_counter()
            reader.read(db)
            kept.append((time.perf_counter() - started) * 1000)
    finally:
        fleet.stop()
    return [
        str(nodes),
        f"{rate / 1024:.1f}",
        f"{rate / nodes:.0f}",
        f"{whole / 1024:.1f}",
        f"{load:.0f}",
        f"{memory / nodes / 1024:.1f}",
        f"{statistics.median(fresh):.1f}",
        f"{statistics.median(kept):.1f}",
    ]


@dataclass
class Fleet:
    """One simulated fleet on its own Redis database, and a client of it."""

    nodes: int
    own_ms: dict[str, float]
    process: WorkerProcess
    client: CorralClient
    added: list[float] = field(default_factory=list)

    def one_job(self, keep: bool) -> None:
        started = time.perf_counter()
        run = self.client.submit(make_spec("bench", options=GenerationOptions(max_tokens=2)))
        first = None
        for event in run.events(timeout_s=30):
            if isinstance(event, DeltaEvent) and first is None:
                first = (time.perf_counter() - started) * 1000
        if first is None:
            raise RuntimeError("no token through corral")
        if keep:
            self.added.append(first - self.own_ms[run.candidate.node])


def start_fleet(
    redis_server: RedisServer, db: int, nodes: int, models: int, log_dir: Path
) -> Fleet:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    prefix = f"n{nodes}x"
    own_ms = {
        p.name: p.first_token_s * 1000
        for p in fleet_profiles(
            nodes,
            models_per_node=models,
            prefix=prefix,
            first_token_s=FIRST_TOKEN_MS / 1000,
            slow_fraction=0,
            failing_fraction=0,
        )
    }
    process = start_sim_fleet(
        url,
        *fleet_args(nodes, models),
        f"--prefix={prefix}",
        heartbeat_s=HEARTBEAT_S,
        log_dir=log_dir,
    )
    client = CorralClient(build_settings(broker_url=url, heartbeat_interval_s=HEARTBEAT_S))
    wait_until(lambda: len(client.nodes()) == nodes, 30, "the fleet")
    # One job pinned to each node first: a client's first send to a queue declares it (one
    # more round trip), which a long-running controller has long done.
    for state in client.nodes():
        warm = make_spec("warm", node=state.name, options=GenerationOptions(max_tokens=1))
        list(client.submit(warm).events(timeout_s=30))
    return Fleet(nodes, own_ms, process, client)


def added_ttft_ms(redis_server: RedisServer, models: int, runs: int, log_dir: Path) -> list[Fleet]:
    """Both fleets run at once and take turns, job by job: the machine's noise (and the
    simulator's own CPU, which a real fleet spreads over its machines) hits both alike."""
    redis_server.client().flushall()
    fleets: list[Fleet] = []
    try:
        for db, nodes in ((1, 2), (2, 200)):
            fleets.append(start_fleet(redis_server, db, nodes, models, log_dir))
        for i in range(runs + 5):
            for fleet in fleets if i % 2 else reversed(fleets):
                fleet.one_job(keep=i >= 5)  # the first jobs warm connections and scripts
    finally:
        for fleet in fleets:
            fleet.client.close()
            fleet.process.stop()
    return fleets


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows, fewer jobs")
    parser.add_argument("--models-per-node", type=int, default=20)
    args = parser.parse_args()
    window_s, runs = (4.0, 40) if args.quick else (20.0, 200)
    console = Console()
    beats = Table(title=f"idle fleet, {HEARTBEAT_S:g} s heartbeats, {args.models_per_node} models")
    for column in (
        "nodes",
        "Redis in KiB/s",
        "B/s per node",
        "NodeInfo KiB",
        "load B",
        "Redis KiB per node",
        "fresh read ms",
        "kept read ms",
    ):
        beats.add_column(column, justify="right")
    server = start_redis()
    try:
        with tempfile.TemporaryDirectory(prefix="corral-fleet-") as tmp:
            log_dir = Path(tmp)
            for nodes in (10, 100, 200):
                beats.add_row(
                    *heartbeat_row(server, nodes, args.models_per_node, window_s, log_dir)
                )
            console.print(beats)
            ttft = Table(title="added time to first token (ms): corral's minus the node's own")
            for column in ("nodes", "jobs", "p50", "p90", "p99"):
                ttft.add_column(column, justify="right")
            medians = {}
            for fleet in added_ttft_ms(server, args.models_per_node, runs, log_dir):
                medians[fleet.nodes] = statistics.median(fleet.added)
                ttft.add_row(
                    str(fleet.nodes),
                    str(len(fleet.added)),
                    *(f"{percentile(fleet.added, q):.1f}" for q in (50, 90, 99)),
                )
            console.print(ttft)
            gap = medians[200] - medians[2]
            verdict = "within" if gap <= 1.0 else "not within"
            console.print(f"p50 at 200 nodes - p50 at 2: {gap:+.1f} ms ({verdict} the 1 ms target)")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
