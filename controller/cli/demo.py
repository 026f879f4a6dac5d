"""``corral demo``: a two-node cluster on this machine and a few routed, streamed jobs."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass

from rich.console import Console

from broker.errors import CorralError, NoNodeAvailable
from broker.schemas import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    ReroutedEvent,
    StartedEvent,
)
from broker.settings import build_settings
from controller.cli.render import nodes_table, summary_line
from controller.client import CorralClient, make_spec
from controller.localcluster import (
    OLLAMA_DEFAULT_URL,
    LocalWorker,
    local_broker,
    make_workdir,
    ollama_answers,
    start_local_worker,
)


@dataclass(frozen=True)
class DemoJob:
    label: str
    prompt: str
    node: str | None = None
    tags: frozenset[str] = frozenset()
    kill_after_tokens: int | None = None
    """Kill the serving worker (SIGKILL) after this many tokens, to show the failover."""


DEMO_JOBS = (
    DemoJob(
        "a job that needs the `code` tag", "How does corral pick a node?", tags=frozenset({"code"})
    ),
    DemoJob("a job sent to a named node (@beta)", "What happens when a node dies?", node="beta"),
    DemoJob("a job with no hints: the least busy node", "How do tokens reach me?"),
    DemoJob(
        "its node dies mid-answer: --retry-partial restarts it on the other node",
        "What happens when a node dies?",
        kill_after_tokens=4,
    ),
)


def run_demo(console: Console) -> int:
    workdir = make_workdir()
    workers: list[LocalWorker] = []
    try:
        with local_broker(workdir) as broker:
            if broker.embedded:
                console.print(
                    "[yellow]warning: no redis-server on PATH; using an embedded fakeredis "
                    "server. Fine for this demo, not for a real cluster "
                    "(`sudo apt-get install redis-server`).[/yellow]"
                )
            backend = ["--ollama", OLLAMA_DEFAULT_URL] if ollama_answers() else ["--simulate"]
            source = (
                "your Ollama at " + OLLAMA_DEFAULT_URL
                if backend[0] == "--ollama"
                else ("the built-in simulated backend")
            )
            console.print(
                f"[bold]corral demo[/bold]: broker {broker.url}, two workers fronting {source}"
            )
            workers = [
                start_local_worker(broker.url, "alpha", [*backend, "--tags", "code"], workdir),
                start_local_worker(broker.url, "beta", [*backend, "--tags", "chat"], workdir),
            ]
            settings = build_settings(broker_url=broker.url)
            with CorralClient(settings) as client:
                _wait_for_nodes(client, workers, console)
                console.print(nodes_table(client.nodes()))
                by_name = {w.name: w for w in workers}
                for job in DEMO_JOBS:
                    _run_job(client, job, console, by_name)
            console.print(f"[dim]worker logs: {workdir}[/dim]")
            return 0
    except CorralError as exc:
        console.print(f"[red]corral demo: {exc}[/red]")
        return 1
    finally:
        for worker in workers:
            worker.stop()
        with contextlib.suppress(OSError):
            for path in workdir.glob("redis*"):
                path.unlink()


def _wait_for_nodes(client: CorralClient, workers: list[LocalWorker], console: Console) -> None:
    deadline = time.monotonic() + 60
    with console.status("starting two node workers..."):
        while time.monotonic() < deadline:
            if sum(n.up for n in client.nodes()) == len(workers):
                return
            for worker in workers:
                if worker.process.poll() is not None:
                    log = worker.log_path.read_text(errors="replace")[-2000:]
                    raise NoNodeAvailable(f"worker {worker.name} exited:\n{log}")
            time.sleep(0.1)
    raise NoNodeAvailable("the demo workers did not come up within 60s")


def _run_job(
    client: CorralClient, job: DemoJob, console: Console, workers: dict[str, LocalWorker]
) -> None:
    console.rule(f"[bold]{job.label}[/bold]")
    prefix = f"@{job.node} " if job.node else ""
    flags = f" --tag {','.join(sorted(job.tags))}" if job.tags else ""
    flags += " --retry-partial" if job.kill_after_tokens else ""
    console.print(f'[cyan]$ corral ask{flags} "{prefix}{job.prompt}"[/cyan]')
    spec = make_spec(
        job.prompt, node=job.node, tags=job.tags, retry_partial=bool(job.kill_after_tokens)
    )
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    serving = ""
    for event in client.stream(spec):
        if isinstance(event, StartedEvent):
            serving = event.node
        elif isinstance(event, DeltaEvent):
            tokens += 1
            if first is None:
                first = (time.perf_counter() - started) * 1000
            console.out(event.text, end="", highlight=False)
            if tokens == job.kill_after_tokens:
                victim = workers[serving]
                victim.process.send_signal(signal.SIGKILL)
                console.print(f"\n[red]✗ killed worker {victim.name} (SIGKILL)[/red]")
        elif isinstance(event, InterruptedEvent):
            console.print(
                f"[yellow]✂ interrupted on {event.node} after {len(event.partial_text)} "
                f"characters: {event.message}[/yellow]"
            )
        elif isinstance(event, ReroutedEvent):
            console.print(f"[yellow]↻ restarted on {event.to_node}[/yellow]")
        elif isinstance(event, DoneEvent):
            console.out("")
            total = (time.perf_counter() - started) * 1000
            console.print(
                f"[green]✓[/green] [dim]{summary_line(event.result, first, total)}[/dim]",
                soft_wrap=True,
            )
        elif isinstance(event, ErrorEvent) and event.final:
            console.print(f"\n[red]job failed: {event.message}[/red]")
