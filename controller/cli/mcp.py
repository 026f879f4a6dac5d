"""``corral mcp``: hand the process over to ``python -m controller.mcp`` (its own front door)."""

from __future__ import annotations

import os
import sys

import click


@click.command(
    "mcp",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def mcp_command(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Serve corral to MCP agents (see `corral mcp --help`)."""
    broker = ctx.parent.params.get("broker") if ctx.parent is not None else None
    env = {**os.environ, **({"CORRAL_BROKER_URL": broker} if broker else {})}
    # The environment, not argv, carries --broker: a URL may hold a password, and argv is in `ps`.
    os.execve(sys.executable, [sys.executable, "-m", "controller.mcp", *args], env)  # noqa: S606
