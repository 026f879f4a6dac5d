"""OpenTelemetry: a gateway started with ``OTEL_EXPORTER_OTLP_ENDPOINT`` sends each request's
spans (request, job, route, send, first token, stream) over OTLP/HTTP protobuf to a collector;
without an endpoint corral loads none of OpenTelemetry's tracing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.controller.gateway.conftest import running_gateway, wait_for_models
from tests.support.otlp import attributes, running_collector
from tests.support.servers import REPO_ROOT, WorkerProcess, wait_until


def test_a_streamed_request_exports_its_spans_over_otlp(
    module_broker_url: str, tmp_path: Path, sim_workers: list[WorkerProcess]
) -> None:
    with running_collector() as (endpoint, collector):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with running_gateway(module_broker_url, tmp_path, env=env) as gw:
            wait_for_models(gw, {"sim-small"})
            body = {
                "model": "sim-small",
                "messages": [{"role": "user", "content": "trace me"}],
                "stream": True,
            }
            with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                job_id = r.headers["x-corral-job"]
                node = r.headers["x-corral-node"]
                chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
            tokens = sum(
                1 for c in chunks if json.loads(c[6:])["choices"][0]["delta"].get("content")
            )
            wanted = {
                "corral.gateway",
                "corral.job",
                "corral.route",
                "corral.send",
                "corral.first_token",
                "corral.stream",
            }

            def jobs_spans_arrived() -> bool:
                spans = collector.by_name()
                return wanted <= set(spans) and any(
                    attributes(s).get("url.path") == "/v1/chat/completions" for s in collector.spans
                )

            wait_until(jobs_spans_arrived, 20, "the job's spans at the collector")

    spans = collector.by_name()
    assert collector.services == {"corral-gateway"}
    assert collector.content_types == {"application/x-protobuf"}
    request = next(
        s for s in collector.spans if attributes(s).get("url.path") == "/v1/chat/completions"
    )
    job = spans["corral.job"]
    assert attributes(request)["http.request.method"] == "POST"
    assert attributes(request)["http.response.status_code"] == 200
    # One trace: the request holds the job, the job holds its four phases, in order.
    assert job.parent_span_id == request.span_id
    phases = [spans[n] for n in ("corral.route", "corral.send", "corral.first_token")]
    phases.append(spans["corral.stream"])
    for phase in phases:
        assert phase.trace_id == request.trace_id
        assert phase.parent_span_id == job.span_id
    starts = [p.start_time_unix_nano for p in phases]
    assert starts == sorted(starts)
    assert (
        spans["corral.first_token"].end_time_unix_nano
        <= spans["corral.stream"].start_time_unix_nano
    )
    assert job.end_time_unix_nano >= spans["corral.stream"].end_time_unix_nano
    job_attributes = attributes(job)
    assert job_attributes["corral.job_id"] == job_id
    assert job_attributes["corral.node"] == node
    assert job_attributes["corral.model"] == "sim-small"
    assert job_attributes["corral.outcome"] == "done"
    assert job_attributes["corral.tokens"] == tokens
    assert "trace me" not in str(collector.spans)  # the prompt never goes into a span


def test_without_an_endpoint_opentelemetry_is_not_loaded(module_broker_url: str) -> None:
    # redis-py itself imports OTel's metrics SDK when it is installed; corral's tracing
    # (the trace SDK, the exporter) stays unloaded.
    code = (
        "import sys\n"
        "from broker.settings import build_settings\n"
        "from controller.gateway.app import build_app\n"
        "from controller.tracing import make_tracing, NO_TRACING\n"
        "settings = build_settings()\n"
        "build_app(settings)\n"
        "assert make_tracing(settings, 'x') is NO_TRACING\n"
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "print(sorted(m for m in sys.modules if m.startswith(ours)))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "CORRAL_BROKER_URL": module_broker_url}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
