"""A bare cloud model name no node holds goes to its provider through a ``--cloud`` worker.

Real redis-server, real worker processes and the real CLI; the provider is the fake Anthropic
Messages API, reached through ``provider_urls`` (where a bare model's provider is, here the
fake instead of api.anthropic.com).
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.cli import ExitCode
from tests.controller.test_cloud_workers import PLANTED_KEY, cloud_worker, events_of
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.support.cli import corral
from tests.support.servers import WorkerProcess, start_worker

MODEL = "claude-inferred-haiku"
REPLY = "Sent to my provider by my name alone."


def test_a_claude_model_goes_to_a_cloud_worker_and_the_fleets_own_models_stay_local(
    broker_url: str, tmp_path: Path
) -> None:
    workers: list[WorkerProcess] = []
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL], reply=REPLY) as fake:
        env = {"CORRAL_PROVIDER_URLS": json.dumps({"anthropic": f"anthropic+{fake.url}"})}
        try:
            # The fleet's own "claude-local" (a model named like Anthropic's) stays on the node.
            workers.append(
                start_worker(
                    broker_url, "pi", "--simulate", "--sim-models", "claude-local", log_dir=tmp_path
                )
            )
            nobody = corral(broker_url, "ask", "--model", MODEL, "hello?", env=env)
            assert nobody.returncode == ExitCode.NO_ROUTE, nobody.stderr
            said = " ".join(nobody.stderr.split())
            assert f"model {MODEL!r}" in said and "on no node" in said
            assert "ANTHROPIC_API_KEY" in said and "corral worker --cloud" in said

            workers.append(cloud_worker(broker_url, "edge", tmp_path))
            answer = corral(broker_url, "ask", "--json", "--model", MODEL, "hello?", env=env)
            assert answer.returncode == ExitCode.OK, answer.stderr
            events = events_of(answer)
            started = [
                (e["node"], e["backend"], e["model"]) for e in events if e["type"] == "started"
            ]
            assert started == [("edge", "cloud-anthropic", MODEL)]
            assert events[-1]["result"]["text"] == REPLY  # type: ignore[index]
            assert fake.state.headers_seen[-1]["x-api-key"] == PLANTED_KEY

            local = corral(broker_url, "ask", "--json", "--model", "claude-local", "hi", env=env)
            assert local.returncode == ExitCode.OK, local.stderr
            started = [e["node"] for e in events_of(local) if e["type"] == "started"]
            assert started == ["pi"]
            # A name no provider uses is still an unknown model, not a cloud call.
            unknown = corral(broker_url, "ask", "--model", "llama9:1b", "hi", env=env)
            assert unknown.returncode == ExitCode.NO_ROUTE
            assert "not installed" in unknown.stderr
        finally:
            for worker in workers:
                worker.stop()
