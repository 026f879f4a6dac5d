"""Per-day token and cost counters: what every finished job adds, what ``corral usage`` sums.

One Redis hash per UTC day (``names.usage_day_key``), kept ``names.USAGE_TTL_S``. Each field is
``<route or node>\\t<model>\\t<measure>``; a route's jobs count under ``@route``, the rest
under their node. Measures: jobs (finished ok), failed, tokens_in, tokens_out (HINCRBY) and
cost_usd (HINCRBYFLOAT). Only the field spelling lives here: the worker writes with its
asyncio client and the controller reads with its own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from broker.schemas import JobResult

__all__ = [
    "UsageRow",
    "increments",
    "rows_from_hash",
    "usage_day",
    "usage_days",
    "usage_group",
]

Measure = Literal["jobs", "failed", "tokens_in", "tokens_out", "cost_usd"]
SEPARATOR = "\t"


def usage_day(epoch_s: float) -> str:
    """The UTC day ``epoch_s`` falls in, as its key spells it."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).date().isoformat()


def usage_days(today: str, days: int) -> list[str]:
    """``today`` and the ``days - 1`` days before it, newest first."""
    start = dt.date.fromisoformat(today)
    return [(start - dt.timedelta(days=n)).isoformat() for n in range(days)]


def usage_group(route: str | None, node: str) -> str:
    return f"@{route}" if route else node


def _field(group: str, model: str, measure: Measure) -> str:
    return SEPARATOR.join((group, model, measure))


def increments(result: JobResult, route: str | None) -> tuple[dict[str, int], dict[str, float]]:
    """What ``result`` adds to its day's hash: integer fields, and the cost field if priced.

    A cancelled attempt counts its tokens (a provider bills them) but no job."""
    group = usage_group(route, result.node)
    counts: dict[str, int] = {
        _field(group, result.model, "tokens_in"): result.usage.prompt_tokens or 0,
        _field(group, result.model, "tokens_out"): result.usage.completion_tokens,
    }
    if result.status == "ok":
        counts[_field(group, result.model, "jobs")] = 1
    elif result.status == "error":
        counts[_field(group, result.model, "failed")] = 1
    costs: dict[str, float] = {}
    if result.usage.cost_usd:
        costs[_field(group, result.model, "cost_usd")] = result.usage.cost_usd
    return counts, costs


@dataclass
class UsageRow:
    """One day's usage of one model by one route or node."""

    day: str
    group: str
    """``@route``, or the node's name."""
    model: str
    jobs: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


def rows_from_hash(day: str, fields: dict[str, str]) -> list[UsageRow]:
    """A day's hash (decoded) as rows, sorted by group and model; odd fields are skipped."""
    rows: dict[tuple[str, str], UsageRow] = {}
    for name, value in fields.items():
        parts = name.split(SEPARATOR)
        if len(parts) != 3:
            continue
        group, model, measure = parts
        row = rows.setdefault((group, model), UsageRow(day, group, model))
        try:
            if measure == "cost_usd":
                row.cost_usd = float(value)
            elif measure in ("jobs", "failed", "tokens_in", "tokens_out"):
                setattr(row, measure, int(value))
        except ValueError:
            continue
    return [rows[key] for key in sorted(rows)]
