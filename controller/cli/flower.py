"""``corral flower``: Flower on the cluster's Celery app, password-protected off loopback."""

from __future__ import annotations

import os
import sys

import click

from broker.errors import CorralError
from controller.cli.common import fail, settings_from
from controller.cli.render import stderr_console
from controller.flower import AUTH_ENV, DEFAULT_PORT, plan_flower, serve_flower


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--address",
    metavar="ADDR",
    help="Interface to listen on (default: every interface with credentials, 127.0.0.1 without).",
)
@click.option(
    "--basic-auth",
    metavar="USER:PASS",
    help=f"Who may log in (default: {AUTH_ENV}; the variable keeps it out of `ps`).",
)
@click.pass_context
def flower(ctx: click.Context, port: int, address: str | None, basic_auth: str | None) -> None:
    """Watch jobs and workers in Flower (job id, node and model; never the prompt)."""
    settings = settings_from(ctx)
    try:
        plan = plan_flower(
            port=port, address=address, basic_auth=basic_auth, environ=dict(os.environ)
        )
        auth = "basic auth on" if plan.credentials else "no auth: loopback only"
        stderr_console().print(f"[dim]flower at {plan.url} ({auth})[/dim]")
        sys.exit(serve_flower(settings, plan))
    except CorralError as exc:
        fail(exc)
