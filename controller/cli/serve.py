"""``corral serve``: the HTTP gateway, in a process of its own.

Front doors never import each other: the command hands the process over to
``python -m controller.gateway`` (as ``corral worker`` does to ``python -m worker``).
"""

from __future__ import annotations

import os
import sys

import click


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def serve(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Serve OpenAI- and Ollama-compatible HTTP APIs (see `corral serve --help`)."""
    broker = ctx.parent.params.get("broker") if ctx.parent is not None else None
    forwarded = ["--broker", broker] if broker else []
    command = [sys.executable, "-m", "controller.gateway", *forwarded, *args]
    os.execv(sys.executable, command)  # noqa: S606
