"""``corral top``: the cluster live, redrawn in place, until ``q`` or Ctrl-C.

Reads the cluster view (one round trip) every ``--interval`` seconds; the numbers come from
``controller.activity``, this module only draws them and reads the keyboard.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.errors import CorralError
from broker.settings import CorralSettings, redacted_url
from controller.activity import ActivityTracker, NodeActivity, totals_of
from controller.breaker import BreakerPhase
from controller.cli.common import fail, output_width, settings_from
from controller.cli.render import BreakerNote, ago, breaker_notes, nodes_table
from controller.client import CorralClient

__all__ = ["top", "top_frame", "watch", "watch_nodes"]

_QUIT_KEYS = {"q", "Q"}
_FRAME_LINES = 8
"""Lines of a frame that are not backend rows (header, totals, the table's edges, heading
and rule, the "more nodes" line), and one spare so that the frame never scrolls."""


def _rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.1f}"


def _breaker_cell(target: str, notes: Mapping[str, BreakerNote]) -> Text:
    note = notes.get(target)
    return Text("closed", style="dim") if note is None else Text(note.short, style="red")


def top_frame(
    nodes: Sequence[NodeActivity],
    notes: Mapping[str, BreakerNote],
    broker: str,
    now: float,
    max_rows: int | None = None,
) -> Group:
    """One frame: a header with the broker (password hidden) and the totals, then one row
    per backend; a down node's rows are greyed. With ``max_rows``, the nodes whose rows do
    not fit are left out (a line says how many): a terminal shows no more, and drawing a
    thousand rows takes over a second."""
    totals = totals_of(nodes)
    opened = sum(1 for n in notes.values() if n.phase is BreakerPhase.OPEN)
    header = Text.assemble(
        ("corral top", "bold"),
        f"  broker {redacted_url(broker)}  ",
        (time.strftime("%H:%M:%S", time.localtime(now)), "dim"),
    )
    summary = Text(
        f"nodes {totals.nodes_up}/{totals.nodes} up · jobs {totals.in_flight}/{totals.capacity} "
        f"in flight · {totals.queued} queued · {totals.tokens_per_s:.1f} tok/s · "
        f"{totals.jobs_done} done · {totals.jobs_failed} failed · "
        f"breakers {opened} open, {len(notes) - opened} half-open"
    )
    table = Table(box=box.SIMPLE_HEAD, expand=False)
    table.add_column("node", overflow="fold")
    table.add_column("state")
    table.add_column("queued", justify="right")
    table.add_column("backend", overflow="fold")
    table.add_column("jobs", justify="right")
    table.add_column("tok/s", justify="right")
    table.add_column("done", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("ttft", justify="right")
    table.add_column("breaker")
    shown = 0
    for node in nodes:
        if max_rows is not None and table.row_count + max(1, len(node.backends)) > max_rows:
            break
        shown += 1
        state = (
            Text("up", style="green") if node.up else Text(f"down, seen {ago(now - node.sent_at)}")
        )
        node_breaker = notes.get(node.name)
        if node_breaker is not None:
            state.append(f"\n{node_breaker.short}", style="red")
        style = None if node.up else "dim"
        rows = node.backends
        cloud = _cloud_label(node)
        if not rows:
            table.add_row(node.name, state, str(node.queued), cloud or "-", *["-"] * 6, style=style)
        for index, backend in enumerate(rows):
            first = index == 0
            failed = Text(str(backend.jobs_failed), style="red" if backend.jobs_failed else "")
            label = (
                backend.name if backend.name == backend.kind else f"{backend.name} ({backend.kind})"
            )
            if backend.quota_left is not None:
                label += f", {backend.quota_left:.0%} quota left"
            table.add_row(
                Text(node.name, style="bold") if first else "",
                state if first else "",
                str(node.queued) if first else "",
                label if backend.healthy else Text(f"{label} unhealthy", style="red"),
                f"{backend.in_flight}/{backend.capacity}",
                _rate(backend.tokens_per_s),
                str(backend.jobs_done),
                failed,
                f"{backend.latency_ms:.0f} ms" if backend.latency_ms is not None else "-",
                _breaker_cell(f"{node.name}/{backend.name}", notes),
                style=style,
            )
        if rows and cloud:
            table.add_row("", "", "", cloud, *["-"] * 6, style=style)
    if not nodes:
        return Group(
            header, summary, Text("no nodes have registered yet (start one with `corral worker`)")
        )
    if shown < len(nodes):
        more = Text(f"… and {len(nodes) - shown} more nodes (counted in the totals)", style="dim")
        return Group(header, summary, table, more)
    return Group(header, summary, table)


def _cloud_label(node: NodeActivity) -> str | None:
    """A ``--cloud`` worker's line: the providers it serves routes of (their jobs count in
    the node's totals; the adapters are made per route as jobs come)."""
    if not node.cloud_providers:
        return None
    return f"cloud routes: {', '.join(sorted(node.cloud_providers))}"


class _Frames:
    """Reads the cluster and draws the next frame."""

    def __init__(
        self, client: CorralClient, settings: CorralSettings, max_rows: int | None = None
    ) -> None:
        self.client = client
        self.max_rows = max_rows
        self.settings = settings
        self.tracker = ActivityTracker()
        self.last: list[NodeActivity] = []
        self.broker = redacted_url(settings.broker_url.get_secret_value())

    def read(self) -> Group:
        view = self.client.cluster()
        self.last = self.tracker.update(view.nodes)
        notes = breaker_notes(view.breakers, view.redis_time, self.settings.breaker_cooldown_s)
        return top_frame(self.last, notes, self.broker, time.time(), self.max_rows)

    def rates_known(self) -> bool:
        return all(
            b.tokens_per_s is not None for n in self.last if n.up for b in n.backends if b.healthy
        )


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """Stdin in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still interrupts), or
    None when stdin is not a terminal."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout_s: float) -> bool:
    """Waits up to ``timeout_s`` for a key; True if it was q."""
    if fd is None:
        time.sleep(timeout_s)
        return False
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready and os.read(fd, 1).decode(errors="replace") in _QUIT_KEYS:
            return True
    return False


def _once(frames: _Frames, console: Console) -> None:
    """One frame, after waiting (up to about one heartbeat interval) for every node's
    second heartbeat: a rate needs two."""
    frame = frames.read()
    deadline = time.monotonic() + frames.settings.heartbeat_interval_s * 1.5 + 0.5
    while not frames.rates_known() and time.monotonic() < deadline:
        time.sleep(min(0.1, frames.settings.heartbeat_interval_s / 4))
        frame = frames.read()
    console.print(frame)


@click.command("top")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=2.0,
    show_default=True,
    metavar="S",
    help="Seconds between redraws.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.pass_context
def top(ctx: click.Context, interval: float, once: bool) -> None:
    """Watch the cluster live: nodes, queues, jobs in flight, tokens per second, jobs done
    and failed, circuit breakers. Press q or Ctrl-C to leave.

    Rates need two heartbeats of a node: --once waits up to about one heartbeat interval."""
    settings = settings_from(ctx)
    console = Console(highlight=False, width=output_width(120))
    try:
        with CorralClient(settings) as client:
            if once:
                _once(_Frames(client, settings), console)  # every node: a script reads it all
                return
            rows = max(1, console.height - _FRAME_LINES) if console.is_terminal else None
            watch(_Frames(client, settings, rows).read, console, interval)
    except CorralError as exc:
        fail(exc)


def watch(read: Callable[[], RenderableType], console: Console, interval: float) -> None:
    """Draw ``read()`` every ``interval`` seconds in place until q or Ctrl-C (also behind
    ``corral nodes --watch``)."""
    # Ctrl-C is a way out, like q: the last frame stays on the screen, the terminal restored.
    with (
        contextlib.suppress(KeyboardInterrupt),
        _keys() as fd,
        Live(read(), console=console, auto_refresh=False) as live,
    ):
        while not _quit_pressed(fd, interval):
            live.update(read(), refresh=True)


def watch_nodes(settings: CorralSettings, interval: float) -> None:
    """``corral nodes --watch``: the ``corral nodes`` table, redrawn in place."""
    console = Console(highlight=False, width=output_width(120))

    def frame(client: CorralClient) -> Group:
        view = client.cluster()
        notes = breaker_notes(view.breakers, view.redis_time, settings.breaker_cooldown_s)
        lines = [Text(note.line, style="red") for note in notes.values()]
        return Group(nodes_table(view.nodes, notes), *lines)

    try:
        with CorralClient(settings) as client:
            watch(lambda: frame(client), console, interval)
    except CorralError as exc:
        fail(exc)
