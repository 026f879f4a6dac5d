"""How events, results, the node list and the fleet's models look on a terminal.

Pure functions of data already read (no Redis here), so each table can be tested by rendering
it to a string.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from rich import box
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from broker.schemas import BackendInfo, JobResult, ModelInfo, NodeInfo, ProgressEvent, Usage
from controller.breaker import HOLD_REASONS, BreakerPhase, BreakerState
from controller.router import NodeState

_SOON_S = 20 * 3600
"""An unload time further away than this shows its date, not just the time of day."""


# --- small formats -------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def disk_size(n: int | None) -> str:
    """``4.9 GB``, ``397 MB``: decimal units, as Ollama lists model sizes."""
    if n is None:
        return "-"
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f} GB"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def context_size(tokens: int | None) -> str:
    """``131072`` -> ``128k``; a length that is not a whole number of k stays as it is."""
    if tokens is None:
        return "-"
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def loaded_state(model: ModelInfo, now: float) -> str:
    """``loaded until 14:05`` (local time), ``loaded (kept)`` or ``installed``."""
    if not model.loaded:
        return "installed"
    if model.loaded_until is None:
        return "loaded (kept)"
    moment = datetime.fromtimestamp(model.loaded_until)
    shown = moment.strftime("%H:%M" if model.loaded_until - now < _SOON_S else "%b %d %H:%M")
    return f"loaded until {shown}"


# --- corral nodes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerNote:
    """A circuit breaker that is not closed, as ``corral nodes`` tells it."""

    target: str
    phase: BreakerPhase
    failures: int
    seconds_left: float
    """Until a probe may try the target again (0 once half-open)."""
    reason: str | None = None
    """The provider's reason when it said how long to stay away (``BreakerState.reason``)."""

    @property
    def short(self) -> str:
        if self.phase is BreakerPhase.OPEN:
            if self.reason is not None:
                return f"{HOLD_REASONS.get(self.reason, self.reason)} ({_left(self.seconds_left)})"
            return f"breaker open ({self.seconds_left:.0f}s)"
        return "breaker half-open"

    @property
    def line(self) -> str:
        if self.phase is BreakerPhase.OPEN and self.reason is not None:
            said = HOLD_REASONS.get(self.reason, self.reason)
            return (
                f"{self.target}: {said}, as its provider said; no jobs go there for"
                f" {_left(self.seconds_left)}, then one probe job tries it"
            )
        if self.phase is BreakerPhase.OPEN:
            what, then = "open", f"one probe job may try it in {self.seconds_left:.0f}s"
        else:
            what, then = "half-open", "the next job routed there is a probe"
        return f"{self.target}: breaker {what} after {self.failures} failures in a row; {then}"


def _left(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 120:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


def breaker_notes(
    breakers: Mapping[str, BreakerState], now: float, cooldown_s: float
) -> dict[str, BreakerNote]:
    """Every open or half-open breaker by target; ``now`` is Redis's clock, as breakers use."""
    notes: dict[str, BreakerNote] = {}
    for target, state in sorted(breakers.items()):
        phase = state.phase(now, cooldown_s)
        if phase is BreakerPhase.CLOSED:
            continue
        left = max(0.0, state.reopens_at(cooldown_s) - now)
        notes[target] = BreakerNote(target, phase, state.failures, left, state.reason)
    return notes


def _backend_cell(node: str, backend: BackendInfo, notes: Mapping[str, BreakerNote]) -> str:
    label = backend.name if backend.name == backend.kind else f"{backend.name} ({backend.kind})"
    lines = [label]
    if backend.url:
        lines.append(f"[dim]{backend.url}[/dim]")
    if not backend.healthy:
        lines.append("[red]unhealthy[/red]")
    note = notes.get(f"{node}/{backend.name}")
    if note is not None:
        lines.append(f"[red]{note.short}[/red]")
    return "\n".join(lines)


def _machine_cell(info: NodeInfo) -> str:
    """Free of total RAM and GPU memory, and the CPU load (1.00: every core busy)."""
    lines = []
    if info.memory is not None:
        lines.append(f"RAM {_gib(info.memory.available_bytes)}/{_gib(info.memory.total_bytes)}")
    lines += [f"GPU {_gib(g.free_bytes)}/{_gib(g.total_bytes)}" for g in info.gpus]
    if info.cpu_load is not None:
        lines.append(f"CPU load {info.cpu_load:.2f}")
    return "\n".join(lines) or "-"


def _state_cell(node: NodeState, notes: Mapping[str, BreakerNote], now: float) -> str:
    lines = ["[green]up[/green]" if node.up else "[red]down[/red]"]
    if not node.up:
        lines.append(f"[dim]seen {ago(now - node.info.sent_at)}[/dim]")
    if node.queued:
        lines.append(f"{node.queued} queued")
    note = notes.get(node.name)
    if note is not None:
        lines.append(f"[red]{note.short}[/red]")
    return "\n".join(lines)


def nodes_table(
    nodes: Sequence[NodeState],
    breakers: Mapping[str, BreakerNote] | None = None,
    now: float | None = None,
) -> Table:
    """One row per backend: its jobs in flight of its capacity, its recent time to first
    token and its models; the node's own cells (state, free RAM and GPU memory, CPU load)
    sit on its first row. ``breakers`` marks open and half-open targets.

    Readable at 120 columns: a backend's URL and the machine's figures go on extra lines of
    their cells rather than into more columns."""
    notes = breakers or {}
    now = time.time() if now is None else now
    table = Table(title="corral nodes", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("node", overflow="fold")
    table.add_column("state")
    table.add_column("backend", overflow="fold")
    table.add_column("jobs", justify="right")
    table.add_column("ttft", justify="right")
    table.add_column("models (* loaded)", overflow="fold")
    table.add_column("machine\nGiB free/total")
    for node in nodes:
        info = node.info
        tags = ",".join(sorted(info.tags))
        node_cells = [
            f"[bold]{info.name}[/bold]" + (f"\n[dim]{tags}[/dim]" if tags else ""),
            _state_cell(node, notes, now),
        ]
        machine = _machine_cell(info)
        backends = info.backends
        if not backends and not info.cloud_providers:
            table.add_row(*node_cells, "-", "-", "-", "-", machine)
        for index, backend in enumerate(backends):
            models = ", ".join(f"{m.name}{'*' if m.loaded else ''}" for m in backend.models)
            first = index == 0
            table.add_row(
                *(node_cells if first else ["", ""]),
                _backend_cell(info.name, backend, notes),
                f"{backend.in_flight}/{backend.capacity}",
                f"{backend.latency_ms:.0f} ms" if backend.latency_ms is not None else "-",
                models or "-",
                machine if first else "",
            )
        if info.cloud_providers:
            # A --cloud worker builds its route adapters on demand: it lists its providers.
            cloud_jobs = max(0, info.in_flight - sum(b.in_flight for b in backends))
            table.add_row(
                *(["", ""] if backends else node_cells),
                "--cloud",
                str(cloud_jobs),
                "-",
                f"routes of {', '.join(sorted(info.cloud_providers))}",
                "" if backends else machine,
            )
    return table


# --- corral models -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetModel:
    """One model on one node's backend, with whether that node is up."""

    node: str
    up: bool
    backend: BackendInfo
    model: ModelInfo


def fleet_models(nodes: Sequence[NodeState]) -> list[FleetModel]:
    """Every (node, backend, model), sorted by model then node so one model's copies sit
    together."""
    rows = [
        FleetModel(node.name, node.up, backend, model)
        for node in nodes
        for backend in node.info.backends
        for model in backend.models
    ]
    rows.sort(key=lambda r: (r.model.name, r.node, r.backend.name))
    return rows


def models_table(nodes: Sequence[NodeState], now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(title="corral models", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", overflow="fold")
    table.add_column("node", overflow="fold")
    table.add_column("backend", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("params", justify="right")
    table.add_column("quant")
    table.add_column("context", justify="right")
    table.add_column("capabilities", overflow="fold")
    table.add_column("state")
    for row in fleet_models(nodes):
        model = row.model
        state = loaded_state(model, now)
        if model.loaded:
            state = f"[green]{state}[/green]"
        table.add_row(
            Text(model.name),
            row.node if row.up else f"{row.node} [red](down)[/red]",
            row.backend.name,
            disk_size(model.size_bytes),
            model.parameter_size or "-",
            model.quantization or "-",
            context_size(model.context_length),
            ",".join(sorted(model.capabilities)) or "-",
            # A down node's state is its last heartbeat's: say so by dimming it.
            state if row.up else f"[dim]{state}[/dim]",
        )
    return table


def model_notes(nodes: Sequence[NodeState]) -> list[str]:
    """Why a backend lists no models, so an empty table is not a mystery."""
    notes = []
    for node in nodes:
        for backend in node.info.backends:
            if not backend.healthy:
                reason = backend.error or "unhealthy"
                notes.append(f"{node.name}/{backend.name}: no models listed ({reason})")
    return notes


def fleet_model_json(row: FleetModel) -> dict[str, object]:
    return {
        "node": row.node,
        "node_up": row.up,
        "backend": row.backend.name,
        "backend_kind": row.backend.kind,
        **row.model.model_dump(mode="json"),
        "capabilities": sorted(row.model.capabilities),
    }


# --- corral models pull / warm / unload / rm -------------------------------------------------


class _LayersOnly(ProgressColumn):
    """Shows ``inner`` for a row that counts bytes (a layer), nothing for a status line."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self._inner = inner

    def render(self, task: Task) -> RenderableType:
        if task.total is None or not task.fields.get("layer"):
            return Text("")
        return self._inner.render(task)


class _Mark(SpinnerColumn):
    """A spinner while a row runs, a tick once done, a cross where the operation failed."""

    def render(self, task: Task) -> RenderableType:
        if task.fields.get("failed"):
            return Text("✗", style="red")
        return super().render(task)


class ModelOpProgress:
    """A model operation's progress as rows, like ``ollama pull`` shows it: a line per status
    in the order they come, and for each layer being downloaded a bar with its bytes.

    Each row is finished when the next status arrives (a pull downloads its layers one after
    the other), so a row whose last step the node skipped (it sends at most ten a second)
    does not stay stuck short of its total.
    """

    def __init__(self, console: Console, waiting_for: str) -> None:
        self.progress = Progress(
            _Mark(finished_text=Text("✓", style="green")),
            TextColumn("{task.description}"),
            _LayersOnly(BarColumn(bar_width=30)),
            _LayersOnly(DownloadColumn()),
            _LayersOnly(TransferSpeedColumn()),
            console=console,
        )
        self._rows: dict[str, TaskID] = {}
        self._totals: dict[TaskID, float] = {}
        self._current: TaskID | None = None
        self._waiting: TaskID | None = self.progress.add_task(waiting_for, total=None)

    def __enter__(self) -> ModelOpProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @property
    def statuses(self) -> list[str]:
        """Every status shown, in order."""
        return list(self._rows)

    def update(self, event: ProgressEvent) -> None:
        self._stop_waiting()
        row = self._rows.get(event.status)
        if row is None:
            self._finish_current()
            row = self.progress.add_task(event.status, total=None, layer=False)
            self._rows[event.status] = row
            self._current = row
        if event.total is not None:
            self._totals[row] = event.total
            self.progress.update(row, total=event.total, completed=event.completed or 0, layer=True)

    def finish(self, succeeded: bool) -> None:
        """The operation ended: a success ticks every row, a failure crosses the row it
        stopped at. With no row to show (an unload, say) nothing is left on the screen."""
        self._stop_waiting()
        if succeeded:
            self._finish_current()
        elif self._current is not None:
            self.progress.update(self._current, failed=True)
        if not self._rows:
            self.progress.live.transient = True
        self._stop()

    def _stop(self) -> None:
        # Not Progress.stop(): off a terminal it adds a newline even when nothing was shown,
        # and again each time it is called.
        live = self.progress.live
        if not live.is_started:
            return
        live.stop()
        console = self.progress.console
        if self._rows and not console.is_interactive:
            console.line()

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self.progress.remove_task(self._waiting)
            self._waiting = None

    def _finish_current(self) -> None:
        if self._current is None:
            return
        total = self._totals.get(self._current, 1)
        self.progress.update(self._current, total=total, completed=total)
        self._current = None


# --- one job -------------------------------------------------------------------------------


def cost_text(cost_usd: float | None) -> str:
    """An estimated cost, with enough digits to show a cheap job's (``~$0.00042``)."""
    if cost_usd is None:
        return ""
    return f"~${cost_usd:.2f}" if cost_usd >= 1 else f"~${cost_usd:.6f}".rstrip("0").rstrip(".")


def usage_text(usage: Usage) -> str:
    """``12 in / 34 out tokens · ~$0.00042``: the prompt count only when the backend said it,
    the cost only for a priced (cloud) model."""
    prompt = f"{usage.prompt_tokens} in / " if usage.prompt_tokens is not None else ""
    cost = f" · {cost_text(usage.cost_usd)}" if usage.cost_usd is not None else ""
    return f"{prompt}{usage.completion_tokens} out tokens{cost}"


def summary_line(
    result: JobResult, client_first_token_ms: float | None, client_total_ms: float
) -> str:
    ttft = f"{client_first_token_ms:.0f} ms" if client_first_token_ms is not None else "-"
    tier = f"tier {result.tier} · " if result.tier else ""
    notes = "".join(f" · {note}" for note in result.notes)
    return (
        f"node {result.node} · {result.backend} · model {result.model} · {tier}"
        f"{usage_text(result.usage)} · first token {ttft} · "
        f"total {client_total_ms / 1000:.2f} s{notes}"
    )


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)
