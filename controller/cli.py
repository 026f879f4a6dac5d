"""The ``corral`` command: parse, call a controller function, print."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

import click
from rich.console import Console

from broker.errors import (
    BackendError,
    BrokerUnavailable,
    ConfigError,
    CorralError,
    JobCancelled,
    JobError,
    RoutingError,
    error_from_code,
)
from broker.schemas import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    InterruptedEvent,
    JobSpec,
    ReroutedEvent,
)
from broker.settings import CorralSettings, build_settings
from controller.client import CorralClient, Event, make_spec
from controller.prompt import parse_tags, split_route_prefix
from controller.render import nodes_table, stderr_console, summary_line


class ExitCode:
    """Distinct exit codes, so scripts can tell what went wrong."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NO_ROUTE = 3  # nothing in the cluster can serve this job
    BACKEND = 4  # the chosen node's backend failed
    JOB = 5  # the node was lost or the job timed out
    BROKER = 6  # Redis cannot be reached
    INTERRUPTED = 130


def exit_code_for(error: CorralError) -> int:
    if isinstance(error, RoutingError):
        return ExitCode.NO_ROUTE
    if isinstance(error, BackendError):
        return ExitCode.BACKEND
    if isinstance(error, JobCancelled):
        return ExitCode.INTERRUPTED
    if isinstance(error, JobError):
        return ExitCode.JOB
    if isinstance(error, BrokerUnavailable):
        return ExitCode.BROKER
    if isinstance(error, ConfigError):
        return ExitCode.USAGE
    return ExitCode.FAILED


def fail(error: CorralError) -> NoReturn:
    stderr_console().print(f"[red]corral: {error}[/red]", markup=True)
    sys.exit(exit_code_for(error))


def settings_from(ctx: click.Context) -> CorralSettings:
    settings: CorralSettings = ctx.obj["settings"]
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", metavar="URL", help="Redis URL (default: CORRAL_BROKER_URL).")
@click.pass_context
def cli(ctx: click.Context, broker: str | None) -> None:
    """corral: one front door for a home lab's LLM servers."""
    if ctx.invoked_subcommand in ("worker", "demo"):
        return  # they build their own settings
    try:
        ctx.obj = {"settings": build_settings(broker_url=broker)}
    except CorralError as exc:
        fail(exc)


@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run a node worker (see `corral worker --help`)."""
    # The worker package is not imported by the controller: hand the process over to it.
    os.execv(sys.executable, [sys.executable, "-m", "worker", *args])  # noqa: S606


@cli.command()
@click.argument("prompt", nargs=-1, required=True)
@click.option("--tag", "tags", multiple=True, help="Required capability tag (repeatable, or a,b).")
@click.option("--model", help="Model to run, e.g. llama3.1:8b.")
@click.option("--node", help="Run on this node (same as an @NODE prefix).")
@click.option("--system", help="A system prompt.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after this many tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option(
    "--timeout", type=click.FloatRange(min=1), help="Seconds of silence before giving up."
)
@click.option("--session", metavar="ID", help="Continue conversation ID (history kept, same node).")
@click.option(
    "--batch", is_flag=True, help="Low priority: interactive jobs overtake it in the queue."
)
@click.option(
    "--retry-partial",
    is_flag=True,
    help="If the node fails mid-answer, restart the job on another node.",
)
@click.option(
    "--attempts",
    type=click.IntRange(1, 10),
    help="Nodes to try before giving up (default: max_attempts, 3).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line, for scripts.")
@click.pass_context
def ask(
    ctx: click.Context,
    prompt: tuple[str, ...],
    tags: tuple[str, ...],
    model: str | None,
    node: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    timeout: float | None,
    session: str | None,
    batch: bool,
    retry_partial: bool,
    attempts: int | None,
    as_json: bool,
) -> None:
    """Route PROMPT to the best node and stream the answer. Prefix @NODE to pick the node."""
    settings = settings_from(ctx)
    try:
        route_name, text = split_route_prefix(" ".join(prompt))
        if node and route_name and node != route_name:
            raise ConfigError(f"--node {node} and @{route_name} disagree")
        spec = make_spec(
            text,
            route=node or route_name,
            model=model,
            tags=parse_tags(tags),
            system=system,
            options=GenerationOptions(max_tokens=max_tokens, temperature=temperature),
            session=session,
            priority="batch" if batch else "interactive",
            retry_partial=retry_partial,
            max_attempts=attempts or settings.max_attempts,
            first_token_timeout_s=settings.first_token_timeout_s,
        )
    except CorralError as exc:
        fail(exc)
    with CorralClient(settings) as client:
        code = run_and_print(
            client, spec, as_json=as_json, timeout_s=timeout or settings.job_timeout_s
        )
    sys.exit(code)


def run_and_print(client: CorralClient, spec: JobSpec, *, as_json: bool, timeout_s: float) -> int:
    """Submit, print tokens as they come, and return the exit code; Ctrl-C cancels the job."""
    err = stderr_console()
    sent_at = time.perf_counter()
    try:
        run = client.submit(spec)
        if not as_json:
            c = run.candidate
            err.print(f"[dim]job {spec.job_id} → {c.node} ({c.backend}, {c.model})[/dim]")
        return _print_events(run.events(timeout_s), as_json, sent_at)
    except KeyboardInterrupt:
        # Also when Ctrl-C lands during the send: a cancel for a job never sent is harmless.
        client.cancel(spec.job_id)
        err.print(f"\n[yellow]cancelled job {spec.job_id}[/yellow]")
        return ExitCode.INTERRUPTED
    except CorralError as exc:
        if as_json:
            _print_json({"type": "error", "code": exc.code, "message": str(exc)})
        fail(exc)


def _print_json(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _print_events(events: Iterator[Event], as_json: bool, sent_at: float) -> int:
    """Print a job's events as they come and return the exit code its end calls for."""
    err = stderr_console()
    first_token_ms: float | None = None
    for event in events:
        if isinstance(event, DeltaEvent) and first_token_ms is None:
            first_token_ms = (time.perf_counter() - sent_at) * 1000
        if as_json:
            _print_json(event.model_dump(mode="json"))
        elif isinstance(event, DeltaEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, ReroutedEvent):
            err.print(
                f"[yellow]↻ moved to {event.to_node} (attempt {event.attempt}): "
                f"{event.reason}[/yellow]"
            )
        elif isinstance(event, ErrorEvent | InterruptedEvent) and not event.final:
            if isinstance(event, InterruptedEvent):
                sys.stdout.write("\n")
                err.print(
                    f"[yellow]✂ interrupted on {event.node} after "
                    f"{len(event.partial_text)} characters: {event.message}; "
                    "restarting elsewhere[/yellow]"
                )
            else:
                err.print(f"[yellow]✗ {event.node}: {event.message}[/yellow]")
        if isinstance(event, DoneEvent):
            if not as_json:
                sys.stdout.write("\n")
                total_ms = (time.perf_counter() - sent_at) * 1000
                err.print(f"[dim]{summary_line(event.result, first_token_ms, total_ms)}[/dim]")
            return ExitCode.OK
        if isinstance(event, ErrorEvent | InterruptedEvent) and event.final:
            if not as_json:
                sys.stdout.write("\n")
                where = f" on node {event.node}" if event.node else ""
                what = "interrupted" if isinstance(event, InterruptedEvent) else "failed"
                err.print(f"[red]corral: job {what}{where}: {event.message}[/red]")
                if isinstance(event, InterruptedEvent):
                    err.print(
                        "[dim]the partial answer is above; --retry-partial restarts such a "
                        "job on another node[/dim]"
                    )
            return exit_code_for(error_from_code(event.code, event.message))
    return ExitCode.JOB


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="NodeInfo JSON, one node per line.")
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """Show every node: up or down, tags, backends, models, jobs."""
    try:
        with CorralClient(settings_from(ctx)) as client:
            states = client.nodes()
    except CorralError as exc:
        fail(exc)
    if as_json:
        for state in states:
            _print_json(
                {"up": state.up, "queued": state.queued, **state.info.model_dump(mode="json")}
            )
        return
    if not states:
        click.echo("no nodes have registered yet (start one with `corral worker`)")
        return
    # Piped output has no terminal width; keep rows whole rather than folded at 80 columns.
    width = None if sys.stdout.isatty() else 200
    Console(highlight=False, width=width).print(nodes_table(states))


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option(
    "--timeout", type=click.FloatRange(min=1), help="Seconds of silence before giving up."
)
@click.pass_context
def attach(ctx: click.Context, job_id: str, as_json: bool, timeout: float | None) -> None:
    """Replay a running or finished job's stream from its first token."""
    settings = settings_from(ctx)
    try:
        with CorralClient(settings) as client:
            reader = client.attach(job_id)
            code = _print_events(
                reader.events(timeout or settings.job_timeout_s), as_json, time.perf_counter()
            )
    except CorralError as exc:
        fail(exc)
    sys.exit(code)


@cli.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Stop a queued or running job; its backend stops generating."""
    try:
        with CorralClient(settings_from(ctx)) as client:
            known = client.cancel(job_id)
    except CorralError as exc:
        fail(exc)
    if not known:
        fail(JobError(f"no job {job_id} (unknown, or older than the replay window)"))
    click.echo(f"cancel sent for job {job_id}")


@cli.command()
def demo() -> None:
    """Start a local broker and two workers, then route and stream a few jobs."""
    from controller.demo import run_demo  # noqa: PLC0415 - only this command needs it

    # Piped or captured output has no width of its own; 120 columns keeps the table readable.
    sys.exit(run_demo(Console(highlight=False, width=None if sys.stdout.isatty() else 120)))


def main() -> None:
    cli(prog_name="corral")
