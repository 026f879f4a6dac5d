"""How tokens, cost and notes read in the summaries and in `corral usage`, and the gateway's
``reasoning_effort``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from rich.console import Console

from broker.schemas import JobResult, Timings, Usage
from broker.usage import UsageRow, increments, rows_from_hash, usage_days
from controller.cli import ExitCode
from controller.cli.commands import cli
from controller.cli.conversation import answer_summary
from controller.cli.render import cost_text, summary_line
from controller.cli.usage import usage_table
from controller.gateway.errors import HttpError
from controller.gateway.openai_api import generation_options


def result(usage: Usage, notes: tuple[str, ...] = (), status: str = "ok") -> JobResult:
    return JobResult(
        job_id="job-0001",
        status=status,  # type: ignore[arg-type]
        node="cloudy",
        backend="claude",
        model="claude-sonnet-4-5",
        text="hi",
        usage=usage,
        timings=Timings(queued_ms=1, first_token_ms=2, total_ms=3),
        notes=notes,
    )


@pytest.mark.parametrize(
    ("cost", "text"),
    [(0.000051, "~$0.000051"), (0.5, "~$0.5"), (12.3456, "~$12.35"), (0.0, "~$0")],
)
def test_cost_reads_with_the_digits_a_cheap_job_needs(cost: float, text: str) -> None:
    assert cost_text(cost) == text


def test_the_ask_summary_has_tokens_in_and_out_the_cost_and_the_notes() -> None:
    usage = Usage(prompt_tokens=12, completion_tokens=34, cost_usd=0.000546)
    line = summary_line(result(usage, ("effort ignored: m has no reasoning control",)), 90, 1500)
    assert line == (
        "node cloudy · claude · model claude-sonnet-4-5 · 12 in / 34 out tokens · ~$0.000546 · "
        "first token 90 ms · total 1.50 s · effort ignored: m has no reasoning control"
    )
    local = summary_line(result(Usage(completion_tokens=5)), None, 100)
    assert "· 5 out tokens · first token -" in local and "$" not in local


def test_the_chat_summary_adds_the_cost_and_notes() -> None:
    line = answer_summary("b", "m", 10, 3, 4, 1, 0.00012, ("effort ignored: m has no x",))
    assert line == (
        "b · m · first token 10 ms · 3 tokens · prompt 4 tokens · ~$0.00012 · 1 message sent"
        " · effort ignored: m has no x"
    )


def test_counters_count_ok_jobs_failed_jobs_and_every_attempts_tokens() -> None:
    ok = result(Usage(prompt_tokens=3, completion_tokens=4, cost_usd=0.25))
    counts, costs = increments(ok, "claude")
    assert counts == {
        "@claude\tclaude-sonnet-4-5\ttokens_in": 3,
        "@claude\tclaude-sonnet-4-5\ttokens_out": 4,
        "@claude\tclaude-sonnet-4-5\tjobs": 1,
    }
    assert costs == {"@claude\tclaude-sonnet-4-5\tcost_usd": 0.25}
    failed, _ = increments(result(Usage(completion_tokens=2), status="error"), None)
    assert failed["cloudy\tclaude-sonnet-4-5\tfailed"] == 1
    cancelled, _ = increments(result(Usage(completion_tokens=2), status="cancelled"), None)
    assert set(cancelled) == {
        "cloudy\tclaude-sonnet-4-5\ttokens_in",
        "cloudy\tclaude-sonnet-4-5\ttokens_out",
    }


def test_a_days_hash_reads_back_as_rows_and_odd_fields_are_skipped() -> None:
    rows = rows_from_hash(
        "2026-12-02",
        {
            "pi\tllama3.2:3b\tjobs": "2",
            "pi\tllama3.2:3b\ttokens_out": "40",
            "@claude\tclaude-x\tcost_usd": "0.5",
            "garbage": "1",
            "pi\tllama3.2:3b\tjobs_later": "9",
            "pi\tqwen\ttokens_in": "not a number",
        },
    )
    assert [(r.group, r.model) for r in rows] == [
        ("@claude", "claude-x"),
        ("pi", "llama3.2:3b"),
        ("pi", "qwen"),
    ]
    assert rows[1].jobs == 2 and rows[1].tokens_out == 40 and rows[0].cost_usd == 0.5


def test_usage_days_go_back_from_today_across_a_month() -> None:
    assert usage_days("2026-12-02", 3) == ["2026-12-02", "2026-12-01", "2026-11-30"]


def test_the_usage_table_has_a_total_row() -> None:
    rows = [
        UsageRow("2026-12-02", "@claude", "claude-x", 2, 0, 10, 20, 0.0003),
        UsageRow("2026-12-01", "pi", "llama3.2:3b", 1, 1, 5, 6, 0.0),
    ]
    console = Console(width=200, record=True)
    console.print(usage_table(rows))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert "2026-12-02 @claude claude-x 2 0 10 20 ~$0.0003" in lines
    assert "2026-12-01 pi llama3.2:3b 1 1 5 6 -" in lines
    assert lines[-1] == "total 3 1 15 26 ~$0.0003"


def test_the_gateway_maps_reasoning_effort_and_refuses_an_unknown_level() -> None:
    assert generation_options({"reasoning_effort": "low"}).effort == "low"
    assert generation_options({}).effort is None
    with pytest.raises(HttpError) as caught:
        generation_options({"reasoning_effort": "extreme"})
    assert caught.value.status == 400
    assert caught.value.message == "'reasoning_effort' must be one of minimal, low, medium, high"


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_effort_is_one_of_four_levels_on_ask_and_chat(command: str) -> None:
    refused = CliRunner().invoke(cli, [command, "--effort", "extreme", "hi"])
    assert refused.exit_code == ExitCode.USAGE
    assert "'extreme' is not one of 'minimal', 'low', 'medium', 'high'" in refused.output
