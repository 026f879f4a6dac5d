"""``corral models``: the fleet's models in one table, and pull / warm / unload / rm."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

from broker.errors import CorralError, error_from_code
from broker.schemas import DoneEvent, ErrorEvent, InterruptedEvent, ModelOpKind, ProgressEvent
from controller.cli.common import (
    ExitCode,
    exit_code_for,
    fail,
    output_width,
    print_events,
    print_json,
    settings_from,
)
from controller.cli.render import (
    ModelOpProgress,
    fleet_model_json,
    fleet_models,
    model_notes,
    models_table,
    stderr_console,
)
from controller.client import CorralClient, Event


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per (node, backend, model).")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """The fleet's models (same as `models list`), and pull / warm / unload / rm on a node.

    Exit codes as for ask (3: unknown node or model, or the node is down; 4: the backend
    failed; 5: the node was lost or went silent), plus 7: the node refused or could not do
    the operation (the model would not fit its free memory, or its backend cannot manage
    models).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list, as_json=as_json)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per (node, backend, model).")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Every node's models: size, parameters, quantisation, context, capabilities, and whether
    each is loaded (until when) or only installed. A down node's row is its last report."""
    try:
        with CorralClient(settings_from(ctx)) as client:
            states = client.nodes()
    except CorralError as exc:
        fail(exc)
    rows = fleet_models(states)
    if as_json:
        for row in rows:
            print_json(fleet_model_json(row))
        return
    if not states:
        click.echo("no nodes have registered yet (start one with `corral worker`)")
        return
    if rows:
        Console(highlight=False, width=output_width(120)).print(models_table(states))
    else:
        click.echo("no models on any node (get one with `corral models pull NODE MODEL`)")
    for note in model_notes(states):
        stderr_console().print(f"[yellow]{escape(note)}[/yellow]")


def _model_op_options(command: Callable[..., None]) -> Callable[..., None]:
    """NODE MODEL and the options every lifecycle command takes."""
    for decorate in (
        click.option(
            "--timeout", type=click.FloatRange(min=1), help="Seconds of silence before giving up."
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON event per line."),
        click.option(
            "--backend",
            metavar="NAME",
            help="Which of the node's backends (default: its first that manages models).",
        ),
        click.argument("model"),
        click.argument("node"),
    ):
        command = decorate(command)
    return command


@models.command()
@_model_op_options
@click.option("--force", is_flag=True, help="Go ahead even if it looks too big for the node.")
@click.pass_context
def pull(
    ctx: click.Context,
    node: str,
    model: str,
    backend: str | None,
    as_json: bool,
    timeout: float | None,
    force: bool,
) -> None:
    """Download MODEL onto NODE, with a progress bar per layer.

    The node refuses (exit 7) once the download shows the model would not fit its free
    memory, unless --force. Ctrl-C stops watching; the download carries on on the node.
    """
    follow_model_op(ctx, "pull", node, model, backend, as_json, timeout, force=force)


@models.command()
@_model_op_options
@click.option(
    "--keep-alive",
    metavar="DURATION",
    help="How long it stays loaded: 30m, 2h, -1 for until unloaded (the default).",
)
@click.option("--force", is_flag=True, help="Load it even if it looks too big for the node.")
@click.pass_context
def warm(
    ctx: click.Context,
    node: str,
    model: str,
    backend: str | None,
    as_json: bool,
    timeout: float | None,
    keep_alive: str | None,
    force: bool,
) -> None:
    """Load MODEL into NODE's memory now, so the first job does not wait for it.

    Refused (exit 7) with the memory estimate when it would not fit the node's free memory,
    unless --force.
    """
    follow_model_op(
        ctx, "warm", node, model, backend, as_json, timeout, force=force, keep_alive=keep_alive
    )


@models.command()
@_model_op_options
@click.pass_context
def unload(
    ctx: click.Context,
    node: str,
    model: str,
    backend: str | None,
    as_json: bool,
    timeout: float | None,
) -> None:
    """Free the memory MODEL takes on NODE (it stays installed)."""
    follow_model_op(ctx, "unload", node, model, backend, as_json, timeout)


@models.command()
@_model_op_options
@click.pass_context
def rm(
    ctx: click.Context,
    node: str,
    model: str,
    backend: str | None,
    as_json: bool,
    timeout: float | None,
) -> None:
    """Delete MODEL from NODE's disk."""
    follow_model_op(ctx, "rm", node, model, backend, as_json, timeout)


def follow_model_op(
    ctx: click.Context,
    op: ModelOpKind,
    node: str,
    model: str,
    backend: str | None,
    as_json: bool,
    timeout: float | None,
    *,
    force: bool = False,
    keep_alive: str | None = None,
) -> NoReturn:
    """Send the operation, show its progress to the end, exit with the code it calls for."""
    settings = settings_from(ctx)
    err = stderr_console()
    sent = False
    try:
        with CorralClient(settings) as client:
            reader = client.model_op(
                node, op, model, backend=backend, force=force, keep_alive=keep_alive
            )
            sent = True
            events = reader.events(timeout or settings.job_timeout_s)
            if as_json:
                code = print_events(events, as_json=True, sent_at=time.perf_counter())
            else:
                code = _show_model_op(events, op, model, node)
    except KeyboardInterrupt:
        # A model operation cannot be cancelled: the node runs it to its end on its own.
        if sent:
            what = f"stopped watching the {op} of {model} on {node}"
            outcome = "the node runs it on its own, so it carries on"
        else:
            what = f"interrupted while sending the {op} of {model} to {node}"
            outcome = "it may or may not have gone out"
        err.print(f"\n[yellow]{what}: {outcome}; `corral models` shows the outcome[/yellow]")
        sys.exit(ExitCode.INTERRUPTED)
    except CorralError as exc:
        if as_json:
            print_json({"type": "error", "code": exc.code, "message": str(exc)})
        fail(exc)
    sys.exit(code)


def _show_model_op(events: Iterator[Event], op: ModelOpKind, model: str, node: str) -> int:
    """Progress rows on stderr, the node's one-line summary on stdout."""
    started = time.perf_counter()
    waiting_for = f"{op} {model}: waiting for node {node}"
    with ModelOpProgress(Console(stderr=True, highlight=False), waiting_for) as display:
        for event in events:
            if isinstance(event, ProgressEvent):
                display.update(event)
            elif isinstance(event, DoneEvent):
                display.finish(succeeded=True)
                result = event.result
                took = time.perf_counter() - started
                click.echo(f"{result.text} on {result.node}/{result.backend} in {took:.1f} s")
                return ExitCode.OK
            elif isinstance(event, ErrorEvent | InterruptedEvent) and event.final:
                display.finish(succeeded=False)
                problem = escape(f"{op} of {model} on {node} failed: {event.message}")
                stderr_console().print(f"[red]corral: {problem}[/red]")
                return exit_code_for(error_from_code(event.code, event.message))
    return ExitCode.JOB
