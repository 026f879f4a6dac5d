"""What a finished job leaves in Redis, and for how long.

One simulated node answering with about 25 tokens per job: Redis's used memory before and after
the jobs, and each key a job left with its size and time to live (the replay log grows by about
one stream event, some 150 bytes, per token). Every key a job
writes expires (the replay log, result and node after ``replay_ttl_s``, the lease a little
later), so a busy cluster's Redis holds about ``jobs per hour x bytes per job`` at most.

    python -m benchmarks.job_footprint [--jobs 200] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.support.servers import start_redis, start_worker, wait_until


def key_kind(key: bytes) -> str:
    text = key.decode(errors="replace")
    return f"job:…:{text.rsplit(':', 1)[-1]}" if text.startswith("corral:job:") else text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per answer size")
    parser.add_argument("--quick", action="store_true", help="50 jobs per size")
    args = parser.parse_args()
    jobs = 50 if args.quick else args.jobs
    console = Console()
    server = start_redis()
    logs = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    worker = start_worker(
        server.url,
        "alpha",
        "--simulate",
        "--sim-first-token-ms",
        "1",
        "--sim-token-ms",
        "0",
        log_dir=logs,
    )
    admin = server.client()
    table = Table(title=f"What one finished job leaves in Redis (mean of {jobs} jobs)")
    for column in ("key", "bytes", "expires after"):
        table.add_column(column, justify="left" if column == "key" else "right")
    try:
        with CorralClient(build_settings(broker_url=server.url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "the node up")
            list(client.stream(make_spec("warm up")))
            time.sleep(0.3)
            before_keys = set(admin.keys())
            before = int(admin.info("memory")["used_memory"])
            events = 0
            for i in track(range(jobs), description="jobs", console=console):
                events += len(list(client.stream(make_spec(f"question {i}"))))
            time.sleep(0.3)
            after = int(admin.info("memory")["used_memory"])
            left = set(admin.keys()) - before_keys
            per_kind: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for k in left:
                per_kind[key_kind(k)].append((admin.memory_usage(k) or 0, admin.ttl(k)))
            for kind, rows in sorted(per_kind.items()):
                size = sum(b for b, _ in rows) // len(rows)
                never = any(t < 0 for _, t in rows)
                expiry = "never" if never else f"{max(t for _, t in rows) / 60:.0f} min"
                table.add_row(kind, f"{size:,}", expiry)
            table.add_section()
            table.add_row("used_memory growth per job", f"{(after - before) / jobs:,.0f}", "")
            table.add_row("stream events per job", f"{events / jobs:.0f}", "")
    finally:
        worker.stop()
        server.stop()
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
