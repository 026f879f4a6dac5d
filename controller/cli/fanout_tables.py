"""The fan-out's live progress table and its answers side by side."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from controller.fanout import FanoutJob, JobState

_STATE_STYLE: dict[JobState, str] = {
    "waiting": "dim",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "failed": "red",
    "cancelled": "yellow",
}


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds is not None else "-"


def _s(seconds: float | None) -> str:
    return f"{seconds:.2f} s" if seconds is not None else "-"


def _state_text(job: FanoutJob, *, short: bool = False) -> Text:
    """The job's state; unless ``short``, with its total time or its error."""
    label: str = job.state
    if not short and job.state == "done":
        label = f"done in {_s(job.total_s)}"
    elif not short and job.error is not None:
        label = f"{job.state}: {job.error}"
    return Text(label, style=_STATE_STYLE[job.state])


def progress_table(jobs: Sequence[FanoutJob]) -> Table:
    """The live view while the jobs run: a row per job."""
    table = Table(box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("node")
    table.add_column("model")
    table.add_column("tokens", justify="right")
    table.add_column("first token", justify="right")
    table.add_column("state", overflow="fold", ratio=1)
    for job in jobs:
        table.add_row(
            str(job.index),
            job.node or "-",
            job.model or "-",
            str(job.tokens),
            _ms(job.first_token_s),
            _state_text(job),
        )
    return table


def answers_table(jobs: Sequence[FanoutJob]) -> Table:
    """The answers side by side: a column per job with its answer (or its error), and rows
    below for where it ran and how fast."""
    table = Table(box=box.HEAVY_HEAD, show_lines=False, expand=True)
    table.add_column("", style="dim", no_wrap=True)
    for job in jobs:
        header = f"{job.index}. {job.label}"
        table.add_column(header, ratio=1, overflow="fold", vertical="top")
    answers: list[Text] = []
    for job in jobs:
        # Text, not markup: an answer may well contain square brackets.
        answer = Text(job.text)
        if job.error is not None:
            if job.text:
                answer.append("\n")
            answer.append(f"✗ {job.state}: {job.error}", style="red")
        answers.append(answer)
    table.add_row("answer", *answers)
    table.add_section()
    table.add_row("node", *(job.node or "-" for job in jobs))
    table.add_row("backend", *(job.backend or "-" for job in jobs))
    table.add_row("model", *(job.model or "-" for job in jobs))
    table.add_row("first token", *(_ms(job.first_token_s) for job in jobs))
    table.add_row("total", *(_s(job.total_s) for job in jobs))
    table.add_row("tokens", *(str(job.tokens) for job in jobs))
    table.add_row("state", *(_state_text(job, short=True) for job in jobs))
    return table
