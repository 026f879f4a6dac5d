"""``corral doctor``: one line per check (✓ / ✗ / !), the fix under each failure."""

from __future__ import annotations

import json
import os
import sys

import click

from broker.errors import CorralError
from controller.cli.common import ExitCode, fail, settings_from
from controller.client import CorralClient
from controller.flower import AUTH_ENV
from controller.health import (
    Check,
    Status,
    check_broker,
    check_flower,
    check_tunnels,
    needs_fixing,
)
from controller.node_health import check_nodes
from controller.probe import probe_targets, run_probe

SYMBOLS = {Status.OK: "✓", Status.FAIL: "✗", Status.WARN: "!", Status.SKIP: "!"}


@click.command()
@click.option(
    "--flower",
    "flower_url",
    metavar="URL",
    envvar="CORRAL_FLOWER_URL",
    help="Flower to check, e.g. http://nas.lan:5555 (default: CORRAL_FLOWER_URL; else skipped).",
)
@click.option("--probe", is_flag=True, help="Also time a tiny job on every node and backend.")
@click.option(
    "--probe-timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds a probe may wait for its answer (a cold model load included).",
)
@click.option("--json", "as_json", is_flag=True, help="The checks as one JSON document.")
@click.pass_context
def doctor(
    ctx: click.Context, flower_url: str | None, probe: bool, probe_timeout: float, as_json: bool
) -> None:
    """Check the broker, every node, Flower and this machine's tunnels; say how to fix each
    problem. Exit 0 when all is well, 1 when something needs fixing."""
    settings = settings_from(ctx)
    checks: list[Check] = []
    try:
        broker_checks, client = check_broker(settings)
        checks += broker_checks
        if client is not None:
            with client:
                node_checks, nodes = check_nodes(client, settings)
                checks += node_checks
            if probe:
                targets, skipped = probe_targets(nodes)
                checks += skipped
                with CorralClient(settings) as corral:
                    checks += [run_probe(corral, t, probe_timeout) for t in targets]
        checks += check_flower(flower_url, os.environ.get(AUTH_ENV))
        checks += check_tunnels()
    except CorralError as exc:
        fail(exc)
    code = ExitCode.FAILED if needs_fixing(checks) else ExitCode.OK
    if as_json:
        document = {"ok": code == ExitCode.OK, "checks": [c.as_json() for c in checks]}
        click.echo(json.dumps(document, indent=2))
    else:
        print_checks(checks)
    sys.exit(code)


def print_checks(checks: list[Check]) -> None:
    area_width = max(len(c.area) for c in checks)
    name_width = max(len(c.name) for c in checks)
    for check in checks:
        line = f"{SYMBOLS[check.status]} {check.area:<{area_width}}  {check.name:<{name_width}}  "
        click.echo(line + check.detail)
        if check.fix and check.status in (Status.FAIL, Status.WARN):
            click.echo(f"{'':{area_width + name_width + 6}}fix: {check.fix}")
    failed = sum(1 for c in checks if c.status is Status.FAIL)
    warned = sum(1 for c in checks if c.status is Status.WARN)
    summary = "all is well" if not failed else f"{failed} to fix"
    click.echo(f"\n{summary}" + (f", {warned} warnings" if warned else ""))
