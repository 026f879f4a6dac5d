"""``corral ask`` with an OTLP endpoint: the job's spans reach the collector before the
command exits (route, send, first token and stream inside ``corral.job``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from broker.settings import build_settings
from controller.client import CorralClient
from tests.support.otlp import attributes, running_collector
from tests.support.servers import REPO_ROOT, running_workers, wait_until

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


def test_ask_sends_its_jobs_spans_before_it_exits(broker_url: str, tmp_path: Path) -> None:
    with (
        running_workers(broker_url, tmp_path, ("tracer", FAST)),
        running_collector() as (endpoint, collector),
    ):
        with CorralClient(build_settings(broker_url=broker_url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "the node up")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OTEL_"))}
        env.update(CORRAL_BROKER_URL=broker_url, CORRAL_OTLP_ENDPOINT=endpoint)
        done = subprocess.run(
            [sys.executable, "-m", "controller", "ask", "--json", "a traced question"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        # No waiting: the command flushed its batch on the way out.
        spans = collector.by_name()
    assert collector.services == {"corral-cli"}
    job = spans["corral.job"]
    for name in ("corral.route", "corral.send", "corral.first_token", "corral.stream"):
        assert spans[name].parent_span_id == job.span_id
        assert spans[name].trace_id == job.trace_id
    assert attributes(job)["corral.node"] == "tracer"
    assert attributes(job)["corral.outcome"] == "done"
    assert attributes(job)["corral.tokens"] > 0
    assert "a traced question" not in str(collector.spans)


def test_a_collector_that_is_down_does_not_fail_the_answer(broker_url: str, tmp_path: Path) -> None:
    with running_workers(broker_url, tmp_path, ("tracer", FAST)):
        with CorralClient(build_settings(broker_url=broker_url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 15, "the node up")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OTEL_"))}
        env.update(CORRAL_BROKER_URL=broker_url, CORRAL_OTLP_ENDPOINT="http://127.0.0.1:9")
        done = subprocess.run(
            [sys.executable, "-m", "controller", "ask", "still answered"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env=env,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "Failed to export" in done.stderr  # said, not hidden, and not fatal
