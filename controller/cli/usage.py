"""``corral usage``: jobs, tokens and estimated cost per day, route or node, and model."""

from __future__ import annotations

import dataclasses
import json
import time

import click
import redis
from rich.console import Console
from rich.table import Table

from broker import names
from broker.errors import BrokerUnavailable, ConfigError
from broker.redis_clients import sync_client
from broker.usage import UsageRow, rows_from_hash, usage_day, usage_days
from controller.cli.common import fail, settings_from
from controller.cli.render import cost_text, stderr_console

MAX_DAYS = names.USAGE_TTL_S // 86400


def read_usage(client: redis.Redis, days: list[str]) -> list[UsageRow]:
    """The rows of each of ``days`` (newest first), as the workers counted them."""
    pipe = client.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(names.usage_day_key(day))
    rows: list[UsageRow] = []
    for day, raw in zip(days, pipe.execute(), strict=True):
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        rows += rows_from_hash(day, fields)
    return rows


def usage_table(rows: list[UsageRow]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("DAY", "ROUTE/NODE", "MODEL"):
        table.add_column(column)
    for column in ("JOBS", "FAILED", "TOKENS IN", "TOKENS OUT", "COST"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.day,
            row.group,
            row.model,
            str(row.jobs),
            str(row.failed),
            str(row.tokens_in),
            str(row.tokens_out),
            cost_text(row.cost_usd) if row.cost_usd else "-",
        )
    total_cost = sum(r.cost_usd for r in rows)
    table.add_row(
        "total",
        "",
        "",
        str(sum(r.jobs for r in rows)),
        str(sum(r.failed for r in rows)),
        str(sum(r.tokens_in for r in rows)),
        str(sum(r.tokens_out for r in rows)),
        cost_text(total_cost) if total_cost else "-",
    )
    return table


@click.command("usage")
@click.option(
    "--days",
    type=click.IntRange(1, MAX_DAYS),
    default=7,
    show_default=True,
    help="How many days back, today (UTC) included.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row, for scripts.")
@click.pass_context
def usage_command(ctx: click.Context, days: int, as_json: bool) -> None:
    """Jobs, tokens in and out, and estimated cost (cloud models) by day, route or node, and
    model. Cost comes from the price table: an estimate, not a bill."""
    settings = settings_from(ctx)
    wanted = usage_days(usage_day(time.time()), days)
    try:
        client = sync_client(settings)
        try:
            rows = read_usage(client, wanted)
        finally:
            client.close()
    except redis.RedisError as exc:
        fail(BrokerUnavailable(f"Redis: {exc.__class__.__name__}"))
    except ValueError as exc:  # a broker URL the client factory cannot read
        fail(ConfigError(str(exc)))
    if as_json:
        for row in rows:
            click.echo(json.dumps(dataclasses.asdict(row)))
        return
    if not rows:
        stderr_console().print(f"no jobs counted in the last {days} day(s)")
        return
    Console(width=200, highlight=False).print(usage_table(rows))
