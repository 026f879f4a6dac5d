"""How events, results and the node list look on a terminal."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from broker.schemas import JobResult
from controller.router import NodeState


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def nodes_table(nodes: list[NodeState]) -> Table:
    table = Table(title="corral nodes", title_justify="left")
    for column in ("node", "state", "tags", "backend", "models (* loaded)", "jobs", "queued"):
        table.add_column(column, overflow="fold")
    table.add_column("free/total GiB")
    table.add_column("seen", justify="right")
    now = time.time()
    for node in nodes:
        info = node.info
        backends = "\n".join(
            (b.name if b.name == b.kind else f"{b.name} ({b.kind})")
            + (f" {b.url}" if b.url else "")
            + ("" if b.healthy else " [red]unhealthy[/red]")
            for b in info.backends
        )
        models = "\n".join(
            ", ".join(f"{m.name}{'*' if m.loaded else ''}" for m in b.models) or "-"
            for b in info.backends
        )
        memory = (
            f"{_gib(info.memory.available_bytes)}/{_gib(info.memory.total_bytes)}"
            if info.memory
            else "-"
        )
        table.add_row(
            info.name,
            "[green]up[/green]" if node.up else "[red]down[/red]",
            ",".join(sorted(info.tags)) or "-",
            backends,
            models,
            f"{info.in_flight}/{info.capacity}",
            str(node.queued),
            memory,
            f"{max(0.0, now - info.sent_at):.0f}s ago",
        )
    return table


def summary_line(
    result: JobResult, client_first_token_ms: float | None, client_total_ms: float
) -> str:
    ttft = f"{client_first_token_ms:.0f} ms" if client_first_token_ms is not None else "-"
    return (
        f"node {result.node} · {result.backend} · model {result.model} · "
        f"{result.usage.completion_tokens} tokens · first token {ttft} · "
        f"total {client_total_ms / 1000:.2f} s"
    )


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)
