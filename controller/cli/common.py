"""What every ``corral`` subcommand shares: exit codes, failing, settings, output."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import NoReturn, TextIO

import click
from rich.markup import escape

from broker.errors import (
    BackendError,
    BrokerUnavailable,
    ConfigError,
    CorralError,
    JobCancelled,
    JobError,
    ModelOpError,
    RequestTooLarge,
    RoutingError,
    error_from_code,
)
from broker.schemas import (
    AnyStreamEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InterruptedEvent,
    ReroutedEvent,
)
from broker.settings import CorralSettings
from controller.cli.render import stderr_console, summary_line
from controller.limits import LIMIT_SETTING, human_bytes


class ExitCode:
    """Distinct exit codes, so scripts can tell what went wrong."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NO_ROUTE = 3  # nothing in the cluster can serve this job
    BACKEND = 4  # the chosen node's backend failed
    JOB = 5  # the node was lost or the job timed out
    BROKER = 6  # Redis cannot be reached
    MODEL_OP = 7  # the node refused or failed a pull / warm / unload / rm
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
    if isinstance(error, ModelOpError):
        return ExitCode.MODEL_OP
    if isinstance(error, ConfigError):
        return ExitCode.USAGE
    return ExitCode.FAILED


def fail(error: CorralError) -> NoReturn:
    stderr_console().print(f"[red]corral: {error}[/red]", markup=True)
    sys.exit(exit_code_for(error))


def settings_from(ctx: click.Context) -> CorralSettings:
    settings: CorralSettings = ctx.obj["settings"]
    return settings


def output_width(piped: int) -> int | None:
    """The terminal's width, or ``piped`` columns (COLUMNS if set) when output is piped:
    piped output has no width of its own, and rich would otherwise fold it at 80."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() else piped


def split_list(values: tuple[str, ...]) -> list[str]:
    """``--models a,b --models c`` -> ``[a, b, c]``, in order."""
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def print_json(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def print_events(events: Iterator[AnyStreamEvent], as_json: bool, sent_at: float) -> int:
    """Print a job's events as they come and return the exit code its end calls for."""
    err = stderr_console()
    first_token_ms: float | None = None
    for event in events:
        if isinstance(event, DeltaEvent) and first_token_ms is None:
            first_token_ms = (time.perf_counter() - sent_at) * 1000
        if as_json:
            print_json(event.model_dump(mode="json"))
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
                if event.result.reason:
                    err.print(f"[dim]why: {escape(event.result.reason)}[/dim]")
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


def prompt_from(words: tuple[str, ...], stdin: TextIO, limit_bytes: int) -> str:
    """The prompt of ``corral ask``: its words, with a ``-`` word (or no words at all and a
    pipe on stdin) standing for standard input, which is how a large prompt comes in.

    Reads at most ``limit_bytes + 1`` characters, so an endless pipe cannot fill memory; a
    prompt over the limit is refused by the client with the limit named.
    """
    if not words:
        if stdin.isatty():
            raise ConfigError("give a PROMPT, or pipe one in: corral ask - < question.txt")
        words = ("-",)
    if words.count("-") > 1:
        raise ConfigError("'-' (standard input) can stand only once in the prompt")
    parts = [_read_bounded(stdin, limit_bytes) if word == "-" else word for word in words]
    text = " ".join(parts) if "-" not in words else _join_with_stdin(words, parts)
    if not text.strip():
        raise ConfigError("the prompt is empty")
    return text


def _read_bounded(stdin: TextIO, limit_bytes: int) -> str:
    text = stdin.read(limit_bytes + 1)
    if len(text) > limit_bytes:  # a character is at least a byte: already over
        raise RequestTooLarge(
            f"the prompt on standard input is over the limit of {human_bytes(limit_bytes)}"
            f" ({LIMIT_SETTING})"
        )
    return text


def _join_with_stdin(words: tuple[str, ...], parts: list[str]) -> str:
    # Words before and after "-" stay on their own lines: `corral ask "Summarise:" - < notes.md`.
    i = words.index("-")
    before, piped, after = " ".join(parts[:i]), parts[i], " ".join(parts[i + 1 :])
    return "\n".join(p for p in (before, piped.rstrip("\n"), after) if p)
