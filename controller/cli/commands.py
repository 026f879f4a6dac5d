"""The ``corral`` command: parse, call a controller function, print."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence

import click
import redis
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from broker.errors import (
    BrokerUnavailable,
    ConfigError,
    CorralError,
    JobError,
)
from broker.schemas import (
    EFFORTS,
    Effort,
    GenerationOptions,
    JobSpec,
)
from broker.settings import build_settings
from controller.cli.acl import acl_command
from controller.cli.chat import chat_command
from controller.cli.common import (
    ExitCode,
    exit_code_for,
    fail,
    output_width,
    print_events,
    print_json,
    prompt_from,
    settings_from,
    split_list,
)
from controller.cli.doctor import doctor
from controller.cli.embed import embed_command
from controller.cli.fanout_tables import answers_table, progress_table
from controller.cli.flower import flower
from controller.cli.limits_view import (
    configured_limit_lines,
    provider_headers_of,
    provider_lines,
)
from controller.cli.mcp import mcp_command
from controller.cli.models import models
from controller.cli.render import (
    breaker_notes,
    nodes_table,
    stderr_console,
)
from controller.cli.route import route_command
from controller.cli.serve import serve
from controller.cli.top import top, watch_nodes
from controller.cli.tunnel import tunnel
from controller.cli.usage import usage_command
from controller.client import CorralClient, Event, make_spec
from controller.fanout import (
    FanoutJob,
    cancel_jobs,
    first_failure,
    model_jobs,
    plan_fanout,
    start_jobs,
    wait_for,
)
from controller.prompt import parse_tags, split_mention
from controller.routes import RouteStore, resolve_mention
from controller.tracing import make_tracing


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", metavar="URL", help="Redis URL (default: CORRAL_BROKER_URL).")
@click.pass_context
def cli(ctx: click.Context, broker: str | None) -> None:
    """corral: one front door for a home lab's LLM servers."""
    if ctx.invoked_subcommand in ("worker", "sim", "demo", "tunnel"):
        return  # they build their own settings (a tunnel needs none)
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


@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim(args: tuple[str, ...]) -> None:
    """Run a simulated fleet of nodes in one process (see `corral sim --help`)."""
    # Like `corral worker`: the controller never imports worker/, so hand the process over.
    os.execv(sys.executable, [sys.executable, "-m", "worker.sim", *args])  # noqa: S606


@cli.command()
@click.argument("prompt", nargs=-1)
@click.option("--tag", "tags", multiple=True, help="Required capability tag (repeatable, or a,b).")
@click.option("--model", help="Model to run, e.g. llama3.1:8b.")
@click.option("--node", help="Run on this node (same as an @NODE prefix).")
@click.option("--system", help="A system prompt.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after this many tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option(
    "--effort",
    type=click.Choice(EFFORTS),
    help="How hard a reasoning model thinks (mapped onto its family's own control).",
)
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
@click.option(
    "--fanout",
    type=click.IntRange(1, 32),
    metavar="N",
    help="Ask the N best nodes at once (one job each); answers side by side.",
)
@click.option(
    "--models",
    "model_list",
    multiple=True,
    metavar="A,B,..",
    help="Ask each of these models at once (one job each, routed as usual); answers side by side.",
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
    effort: Effort | None,
    timeout: float | None,
    session: str | None,
    batch: bool,
    retry_partial: bool,
    attempts: int | None,
    fanout: int | None,
    model_list: tuple[str, ...],
    as_json: bool,
) -> None:
    """Route PROMPT to the best node and stream the answer. Prefix @NODE to pick the node.

    A PROMPT of `-`, or none with a pipe on stdin, reads the prompt from standard input.

    With --fanout or --models, several jobs run at once: a live table shows their progress,
    then their answers print side by side. The exit code is 0 only if every job succeeded
    (otherwise the leftmost failed job's code). --json then tags each event line with
    job_index and job_label.
    """
    settings = settings_from(ctx)
    models = split_list(model_list)
    tracing = make_tracing(settings, "corral-cli")
    client = CorralClient(settings, tracing=tracing)
    try:
        words = prompt_from(prompt, sys.stdin, settings.max_prompt_bytes)
        mentioned, text = split_mention(words)
        if node and mentioned and node != mentioned:
            raise ConfigError(f"--node {node} and @{mentioned} disagree")
        _check_many_flags(fanout, models, node or mentioned, model, session)
        route = route_url = None
        if mentioned:
            mention = resolve_mention(
                mentioned, RouteStore(client.redis), client.nodes(), model=model
            )
            mentioned, model = mention.node, mention.model
            route, route_url = mention.route_name, mention.route_url
        spec = make_spec(
            text,
            node=node or mentioned,
            model=model,
            route=route,
            route_url=route_url,
            tags=parse_tags(tags),
            system=system,
            options=GenerationOptions(
                max_tokens=max_tokens, temperature=temperature, effort=effort
            ),
            session=session,
            priority="batch" if batch else "interactive",
            retry_partial=retry_partial,
            max_attempts=attempts or settings.max_attempts,
            first_token_timeout_s=settings.first_token_timeout_s,
        )
    except CorralError as exc:
        client.close()
        fail(exc)
    except redis.RedisError as exc:
        client.close()
        fail(BrokerUnavailable(f"Redis: {exc.__class__.__name__}"))
    timeout_s = timeout or settings.job_timeout_s
    with client:
        if fanout is not None or models:
            code = run_many(client, spec, fanout, models, as_json=as_json, timeout_s=timeout_s)
        else:
            code = run_and_print(client, spec, as_json=as_json, timeout_s=timeout_s)
    tracing.shutdown()  # sends the spans still batched
    sys.exit(code)


def _check_many_flags(
    fanout: int | None, models: list[str], node: str | None, model: str | None, session: str | None
) -> None:
    if fanout is not None and models:
        raise ConfigError("--fanout and --models do not go together: pick the nodes or the models")
    if fanout is not None and node:
        raise ConfigError("--fanout picks the nodes itself: drop @NODE / --node")
    if models and model:
        raise ConfigError("--models and --model do not go together")
    if (fanout is not None or models) and session:
        raise ConfigError(
            "--session continues one conversation: it cannot go with --fanout/--models"
        )


def run_and_print(client: CorralClient, spec: JobSpec, *, as_json: bool, timeout_s: float) -> int:
    """Submit, print tokens as they come, and return the exit code; Ctrl-C cancels the job."""
    err = stderr_console()
    sent_at = time.perf_counter()
    try:
        run = client.submit(spec)
        if not as_json:
            c = run.candidate
            err.print(f"[dim]job {spec.job_id} → {c.node} ({c.backend}, {c.model})[/dim]")
        return print_events(run.events(timeout_s), as_json, sent_at)
    except KeyboardInterrupt:
        # Also when Ctrl-C lands during the send: a cancel for a job never sent is harmless.
        client.cancel(spec.job_id)
        err.print(f"\n[yellow]cancelled job {spec.job_id}[/yellow]")
        return ExitCode.INTERRUPTED
    except CorralError as exc:
        if as_json:
            print_json({"type": "error", "code": exc.code, "message": str(exc)})
        fail(exc)


def run_many(
    client: CorralClient,
    spec: JobSpec,
    fanout: int | None,
    models: list[str],
    *,
    as_json: bool,
    timeout_s: float,
) -> int:
    """Run ``spec`` on the ``fanout`` best nodes, or once per model in ``models``, all at
    once; show them live, then the answers side by side. Returns the exit code."""
    err = stderr_console()
    try:
        jobs = plan_fanout(client, spec, fanout) if fanout else model_jobs(spec, models)
    except CorralError as exc:
        if as_json:
            print_json({"type": "error", "code": exc.code, "message": str(exc)})
        fail(exc)
    if fanout and len(jobs) < fanout:
        names = ", ".join(job.label for job in jobs)
        err.print(f"[yellow]only {len(jobs)} node(s) can serve this job: asking {names}[/yellow]")
    lock = threading.Lock()  # JSON lines come from the jobs' threads: one whole line at a time

    def print_tagged(job: FanoutJob, line: dict[str, object]) -> None:
        with lock:
            print_json({"job_index": job.index, "job_label": job.label, **line})

    def print_event(job: FanoutJob, event: Event) -> None:
        print_tagged(job, event.model_dump(mode="json"))

    def print_error(job: FanoutJob, exc: CorralError) -> None:
        print_tagged(job, {"type": "error", "code": exc.code, "message": str(exc), "final": True})

    if not as_json:
        for job in jobs:
            err.print(f"[dim]{job.index}. {escape(job.label)}: job {job.spec.job_id}[/dim]")
    start_jobs(
        client,
        jobs,
        timeout_s,
        on_event=print_event if as_json else None,
        on_error=print_error if as_json else None,
    )
    try:
        if as_json:
            wait_for(jobs)
        else:
            # Transient: the live rows give way to the side-by-side answers at the end.
            with Live(
                get_renderable=lambda: progress_table(jobs),
                console=Console(stderr=True, highlight=False),
                refresh_per_second=8,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            ):
                wait_for(jobs)
    except KeyboardInterrupt:
        running = [job for job in jobs if not job.ended.is_set()]
        cancel_jobs(client, jobs)
        if not as_json:
            rest = "" if len(running) == len(jobs) else " (the others had finished)"
            err.print(f"\n[yellow]cancelled {len(running)} of {len(jobs)} jobs{rest}[/yellow]")
            _print_answers(jobs)
        return ExitCode.INTERRUPTED
    if not as_json:
        _print_answers(jobs)
    failed = first_failure(jobs)
    if failed is None:
        return ExitCode.OK
    return exit_code_for(failed.error) if failed.error is not None else ExitCode.JOB


def _print_answers(jobs: Sequence[FanoutJob]) -> None:
    Console(highlight=False, width=output_width(120)).print(answers_table(jobs))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="NodeInfo JSON, one node per line.")
@click.option(
    "--reset-breaker",
    "reset",
    metavar="TARGET",
    multiple=True,
    help="Close a circuit breaker now (NODE or NODE/BACKEND), e.g. after fixing the node.",
)
@click.option("--watch", is_flag=True, help="Redraw in place until q or Ctrl-C (see `corral top`).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=2.0,
    show_default=True,
    metavar="S",
    help="Seconds between redraws with --watch.",
)
@click.pass_context
def nodes(
    ctx: click.Context, as_json: bool, reset: tuple[str, ...], watch: bool, interval: float
) -> None:
    """Show every node: up or down, backends with jobs/capacity and time to first token,
    models (* loaded), free RAM and GPU memory, CPU load, and open circuit breakers."""
    settings = settings_from(ctx)
    if watch:
        if as_json or reset:
            fail(ConfigError("--watch draws the table: not with --json or --reset-breaker"))
        watch_nodes(settings, interval)
        return
    try:
        with CorralClient(settings) as client:
            for target in reset:
                if target not in client.cluster().breakers:
                    raise ConfigError(f"no circuit breaker on {target!r} to reset")
                client.breakers.reset(target)
                stderr_console().print(f"breaker on {target} closed")
            view = client.cluster()
            provider_headers = provider_headers_of(client.redis, view)
    except CorralError as exc:
        fail(exc)
    notes = breaker_notes(view.breakers, view.redis_time, settings.breaker_cooldown_s)
    if as_json:
        for state in view.nodes:
            own = {
                t: n.phase.value
                for t, n in notes.items()
                if t == state.name or t.startswith(f"{state.name}/")
            }
            print_json(
                {
                    "up": state.up,
                    "queued": state.queued,
                    "breakers": own,
                    "provider_limits": {
                        t.partition("/")[2]: dict(h.headers)
                        for t, h in provider_headers.items()
                        if t.partition("/")[0] == state.name
                    },
                    **state.info.model_dump(mode="json"),
                }
            )
        return
    if not view.nodes:
        click.echo("no nodes have registered yet (start one with `corral worker`)")
        return
    console = Console(highlight=False, width=output_width(120))
    console.print(nodes_table(view.nodes, notes))
    for note in notes.values():
        console.print(f"[red]{note.line}[/red]")
    for line in [*configured_limit_lines(settings.limits, view), *provider_lines(provider_headers)]:
        console.print(escape(line))


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
            code = print_events(
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
    from controller.cli.demo import run_demo  # noqa: PLC0415 - only this command needs it

    # Piped or captured output has no width of its own; 120 columns keeps the table readable.
    sys.exit(run_demo(Console(highlight=False, width=None if sys.stdout.isatty() else 120)))


cli.add_command(models)
cli.add_command(acl_command)
cli.add_command(flower)
cli.add_command(mcp_command)
cli.add_command(tunnel)
cli.add_command(doctor)
cli.add_command(chat_command)
cli.add_command(serve)
cli.add_command(top)
cli.add_command(route_command)
cli.add_command(usage_command)
cli.add_command(embed_command)


def main() -> None:
    cli(prog_name="corral")
