"""Usage, cost, effort and context limits through the whole path: a real redis-server, a real
worker process fronting the simulated backend and the fake Anthropic Messages API, and the
real CLI, each call its own process.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis

from broker import names
from controller.cli import ExitCode
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.cli import corral
from tests.support.servers import start_worker

CLAUDE = "claude-sonnet-4-5"
"""A model the shipped price table prices ($3 in, $15 out per million tokens)."""
KEY = "sk-ant-usage-PLANTED-7e21"


class Cluster(NamedTuple):
    broker_url: str
    claude: FakeAnthropic


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def cluster(module_broker_url: str, module_log_dir: Path) -> Iterator[Cluster]:
    with running_fake_anthropic(api_key=KEY, models=[CLAUDE], reply="Costs are estimates.") as fake:
        config = module_log_dir / "mixed.yaml"
        config.write_text(
            "worker:\n  backends:\n"
            "    - kind: simulated\n      name: sim\n      first_token_s: 0.01\n"
            "      token_s: 0.001\n"
            f"    - kind: anthropic\n      name: claude\n      url: {fake.url}\n"
        )
        worker = start_worker(
            module_broker_url,
            "mixed",
            log_dir=module_log_dir,
            env={"ANTHROPIC_API_KEY": KEY, "CORRAL_CONFIG": str(config)},
        )
        try:
            yield Cluster(module_broker_url, fake)
        finally:
            worker.stop()


def usage_rows(broker_url: str, *args: str) -> list[dict[str, Any]]:
    shown = corral(broker_url, "usage", "--json", *args)
    assert shown.returncode == ExitCode.OK, shown.stderr
    return [json.loads(line) for line in shown.stdout.splitlines()]


def test_jobs_add_tokens_and_cost_per_route_and_day_and_corral_usage_sums_them(
    cluster: Cluster,
) -> None:
    url = cluster.broker_url
    for _ in range(2):
        local = corral(url, "ask", "--model", "sim-small", "how", "are", "you")
        assert local.returncode == ExitCode.OK, local.stderr
    # Local: tokens in and out, no cost.
    assert " in / " in local.stderr and " out tokens" in local.stderr and "~$" not in local.stderr

    port = cluster.claude.url.rsplit(":", 1)[1]
    added = corral(url, "route", "add", "claude", f"anthropic+http://127.0.0.1:{port}", CLAUDE)
    assert added.returncode == ExitCode.OK, added.stderr
    cloud = corral(url, "ask", "--json", "@claude", "what", "does", "it", "cost?")
    assert cloud.returncode == ExitCode.OK, cloud.stderr
    (done,) = [e for e in map(json.loads, cloud.stdout.splitlines()) if e["type"] == "done"]
    usage = done["result"]["usage"]
    # The fake counts words: 4 in, "Costs are estimates." 3 out.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (4, 3)
    assert usage["cost_usd"] == pytest.approx((4 * 3.0 + 3 * 15.0) / 1e6)

    summary = corral(url, "ask", "@claude", "and", "again?")
    assert summary.returncode == ExitCode.OK, summary.stderr
    assert "2 in / 3 out tokens · ~$0.000051" in flat(summary.stderr)

    rows = {(r["group"], r["model"]): r for r in usage_rows(url)}
    today = dt.datetime.now(dt.UTC).date().isoformat()
    sim = rows[("mixed", "sim-small")]
    assert (sim["day"], sim["jobs"], sim["failed"]) == (today, 2, 0)
    assert sim["tokens_in"] == 6 and sim["tokens_out"] > 0 and sim["cost_usd"] == 0
    claude = rows[("@claude", CLAUDE)]
    assert (claude["jobs"], claude["tokens_in"], claude["tokens_out"]) == (2, 6, 6)
    assert claude["cost_usd"] == pytest.approx((6 * 3.0 + 6 * 15.0) / 1e6)

    table = corral(url, "usage", "--days", "3")
    assert table.returncode == ExitCode.OK, table.stderr
    lines = [flat(line) for line in table.stdout.splitlines()]
    assert f"{today} @claude {CLAUDE} 2 0 6 6 ~$0.000108" in lines
    assert lines[-1].startswith("total 4 0 12 ")

    client = redis.Redis.from_url(url)
    try:
        ttl = client.ttl(names.usage_day_key(today))
    finally:
        client.close()
    assert 89 * 86400 < ttl <= 90 * 86400
    assert KEY not in table.stdout + cloud.stdout + summary.stderr


def test_effort_reaches_claude_as_a_thinking_budget_and_is_ignored_by_a_simulated_model(
    cluster: Cluster,
) -> None:
    url = cluster.broker_url
    thought = corral(url, "ask", "--node", "mixed", "--model", CLAUDE, "--effort", "low", "hm")
    assert thought.returncode == ExitCode.OK, thought.stderr
    assert thought.stdout.strip() == "Costs are estimates."  # no thinking text in the answer
    body = cluster.claude.state.chat_bodies[-1]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "effort ignored" not in thought.stderr

    ignored = corral(url, "ask", "--model", "sim-small", "--effort", "high", "hm")
    assert ignored.returncode == ExitCode.OK, ignored.stderr
    assert "effort ignored: sim-small has no reasoning control" in flat(ignored.stderr)


def test_a_prompt_too_long_for_every_model_fails_with_exit_3_and_the_reason(
    cluster: Cluster,
) -> None:
    url = cluster.broker_url
    # ~10k tokens: more than sim-small's 8k context (the simulated backend's loaded model),
    # so the job takes sim-large (128k) or Claude (200k) instead.
    fits = corral(url, "ask", "-", stdin="word " * 8000)
    assert fits.returncode == ExitCode.OK, fits.stderr
    assert "model sim-small" not in fits.stderr
    assert "model sim-large" in fits.stderr or f"model {CLAUDE}" in fits.stderr
    too_long = corral(url, "ask", "--model", "sim-large", "-", stdin="x" * 4 * 140_000)
    assert too_long.returncode == ExitCode.NO_ROUTE
    assert "prompt ~140k tokens exceeds sim-large's 131k context on mixed" in flat(too_long.stderr)


def test_route_caps_shows_the_models_row_of_each_table(cluster: Cluster) -> None:
    url = cluster.broker_url
    port = cluster.claude.url.rsplit(":", 1)[1]
    added = corral(url, "route", "add", "sonnet", f"anthropic+http://127.0.0.1:{port}", CLAUDE)
    assert added.returncode == ExitCode.OK, added.stderr
    caps = corral(url, "route", "caps", "sonnet")
    assert caps.returncode == ExitCode.OK, caps.stderr
    lines = [flat(line) for line in caps.stdout.splitlines()]
    assert "context 200k tokens · max output 64k" in lines
    assert "can tools yes · vision yes · thinking yes · json yes" in lines
    assert "price $3 in / $15 out per million tokens (estimate)" in lines
    # The serving worker's heartbeat carries the table's capabilities for the cloud model.
    assert any(
        line.startswith("served by mixed/claude (up): chat, thinking, tools, vision")
        for line in lines
    )
