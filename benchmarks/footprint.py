"""A worker's footprint: resident memory and idle CPU of a node fronting one Ollama backend,
and what its imports cost.

1. A real ``python -m worker --ollama URL`` (Celery's solo pool, as a capacity-1 node runs)
   against a fake Ollama on loopback and a Redis of its own, at the default 2-second
   heartbeat. After it is ready and has settled, its RSS, PSS and USS are read from
   /proc/<pid>/smaps_rollup, and its CPU time is sampled over an idle window. The Celery pool
   is the same process (solo, or threads for capacity > 1), so these are the pool's figures.
   Beside it, idle plain Celery workers (``benchmarks.celery_noop``): on corral's Celery
   settings, and from Celery alone, which is the floor any Celery-based worker starts from.
2. What imports cost: the RSS of a fresh interpreter after importing each layer in turn
   (bare Python, then pydantic, redis, httpx, celery, the worker's own modules, and what a
   running node imports on top), and the slowest imports by ``python -X importtime``.

    python -m benchmarks.footprint [--quick] [--idle-s 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.fakes.fake_ollama import running_fake_ollama
from tests.support.servers import REPO_ROOT, WorkerProcess, start_redis, start_worker

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LEAN_IMPORTS = "exec(compile(open('worker/lean_imports.py').read(), 'lean_imports', 'exec'))"
# Layers imported one after another in a fresh interpreter: each row's growth is what that
# layer adds on top of the ones above it.
IMPORT_LAYERS: tuple[tuple[str, str], ...] = (
    ("bare interpreter", ""),
    ("pydantic, pydantic-settings", "import pydantic, pydantic_settings"),
    # Next, as in the worker (its package imports it first): redis-py (sync and asyncio),
    # kombu's serializers and Celery's debug helpers without OpenTelemetry, PyYAML and psutil,
    # and httpx's CLI kept out (run from its file: the worker package imports everything below).
    (
        "worker/lean_imports.py (redis-py, kombu.serialization, celery.utils.debug)",
        _LEAN_IMPORTS,
    ),
    ("httpx", "import httpx"),
    ("click", "import click"),
    (
        "celery (app, worker, kombu redis)",
        "import celery, celery.apps.worker, kombu.transport.redis",
    ),
    ("broker.*", "import broker.celery_app, broker.schemas, broker.settings"),
    ("worker (python -m worker's imports)", "import worker.__main__"),
    (
        "imported once running (Celery's consumer, the Ollama adapter, httpcore on anyio)",
        "import celery.worker.consumer, celery.concurrency.solo, worker.backends.ollama, "
        "httpcore, h11, anyio._backends._asyncio",
    ),
)


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss and the private (USS) part from the kernel's rollup of the process's maps."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0])
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat.rsplit(")", 1)[1].split()
    utime, stime = int(after_name[11]), int(after_name[12])
    return (utime + stime) / _CLOCK_TICKS


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def idle_figures(worker: WorkerProcess, idle_s: float, settle_s: float) -> dict[str, float]:
    pid = worker.process.pid
    time.sleep(settle_s)
    before = cpu_seconds(pid)
    started = time.monotonic()
    time.sleep(idle_s)
    cpu = cpu_seconds(pid) - before
    elapsed = time.monotonic() - started
    memory = memory_kb(pid)
    threads = thread_count(pid)
    return {
        "rss_mb": memory["rss"] / 1024,
        "pss_mb": memory["pss"] / 1024,
        "uss_mb": memory["uss"] / 1024,
        "cpu_pct": 100 * cpu / elapsed,
        "threads": float(threads),
        "idle_s": elapsed,
    }


def idle_workers(idle_s: float, settle_s: float) -> dict[str, dict[str, float]]:
    """A corral node fronting one Ollama, and plain Celery workers beside it, each idle."""
    redis_server = start_redis()
    log_dir = Path(tempfile.mkdtemp(prefix="corral-footprint-"))
    figures: dict[str, dict[str, float]] = {}
    try:
        with running_fake_ollama(models=("llama3.2:1b",)) as ollama:
            node = start_worker(
                redis_server.url,
                "footprint",
                "--ollama",
                ollama.url,
                log_dir=log_dir,
                heartbeat_s=2.0,
            )
            try:
                figures["corral worker, one Ollama backend"] = idle_figures(node, idle_s, settle_s)
            finally:
                node.stop()
        for label, args in (
            ("plain Celery worker, corral's Celery settings", ()),
            ("plain Celery worker, Celery alone (no corral modules)", ("--bare",)),
        ):
            plain = start_worker(
                redis_server.url,
                "plain",
                *args,
                module="benchmarks.celery_noop",
                log_dir=log_dir,
            )
            try:
                figures[label] = idle_figures(plain, idle_s, settle_s)
            finally:
                plain.stop()
    finally:
        redis_server.stop()
    return figures


def layer_rss_kb() -> list[tuple[str, int]]:
    """RSS after each import layer, cumulative, in one fresh interpreter."""
    script = "\n".join(
        [
            "import sys",
            "def rss():",
            "    for line in open('/proc/self/status'):",
            "        if line.startswith('VmRSS:'):",
            "            return int(line.split()[1])",
            *(f"{code}\nprint(rss(), flush=True)" for _, code in IMPORT_LAYERS),
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [(label, int(kb)) for (label, _), kb in zip(IMPORT_LAYERS, out, strict=True)]


def slowest_imports(count: int) -> tuple[list[tuple[str, float]], int]:
    """Import time of ``python -m worker``'s imports, summed over each top-level package's
    modules (each module's own time, so nothing counts twice), and how many modules load."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import worker.__main__"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    own_ms: dict[str, float] = {}
    modules = 0
    for line in run.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <two spaces per nesting level><name>"
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        modules += 1
        top = name.strip().split(".")[0]
        own_ms[top] = own_ms.get(top, 0.0) + int(self_us) / 1000
    ranked = sorted(own_ms.items(), key=lambda item: item[1], reverse=True)
    return ranked[:count], modules


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="an 8 s idle window per worker")
    parser.add_argument("--idle-s", type=float, default=30.0)
    args = parser.parse_args()
    idle_s = 8.0 if args.quick else args.idle_s

    console = Console()
    table = Table(title=f"idle workers, solo pool, {idle_s:.0f} s idle each")
    for column in ("process", "RSS MB", "PSS MB", "USS MB", "CPU % of a core", "threads"):
        table.add_column(column, justify="left" if column == "process" else "right")
    for label, figures in idle_workers(idle_s, settle_s=3.0).items():
        table.add_row(
            label,
            f"{figures['rss_mb']:.1f}",
            f"{figures['pss_mb']:.1f}",
            f"{figures['uss_mb']:.1f}",
            f"{figures['cpu_pct']:.2f}",
            f"{figures['threads']:.0f}",
        )
    console.print(table)

    layers = Table(title="RSS after each import layer (one fresh interpreter, cumulative)")
    for column in ("layer", "RSS MB", "added MB"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    previous = 0
    for label, kb in layer_rss_kb():
        layers.add_row(
            label, f"{kb / 1024:.1f}", f"{(kb - previous) / 1024:+.1f}" if previous else ""
        )
        previous = kb
    console.print(layers)

    ranked, modules = slowest_imports(12)
    slow = Table(
        title=f"python -X importtime -c 'import worker.__main__': {modules} modules, by package"
    )
    slow.add_column("package")
    slow.add_column("import ms", justify="right")
    for name, ms in ranked:
        slow.add_row(name, f"{ms:.1f}")
    console.print(slow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
