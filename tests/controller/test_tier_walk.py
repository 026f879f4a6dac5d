"""The tier walk end to end: a real redis-server, real worker processes, the real CLI.

One model (``sim-small``) has a route in each tier: a local node (the simulated backend), a
laptop whose worker fronts an agent CLI (the fake CLI script, on a "subscription"), and a
metered API (the fake Anthropic API). A second model (``claude-b``, metered) is next in the
priority list. Each step takes routes away and checks which tier answers and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.schemas import DoneEvent, JobResult, StartedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.fakes.fake_cli import write_fake_cli
from tests.support.servers import REPO_ROOT, WorkerProcess, start_worker, wait_until

KEY = "sk-ant-tiers-PLANTED-3b9d"
PRIORITY = ("sim-small", "claude-b")


def yaml_worker(path: Path, backend: str) -> Path:
    path.write_text("worker:\n  backends:\n" + backend)
    return path


def ask(client: CorralClient) -> tuple[StartedEvent, JobResult]:
    started: list[StartedEvent] = []
    for event in client.stream(make_spec("which tier are you?")):
        if isinstance(event, StartedEvent):
            started.append(event)
        if isinstance(event, DoneEvent):
            return started[-1], event.result
    raise AssertionError("the job ended without a result")


def node_up(client: CorralClient, name: str) -> bool:
    return any(n.name == name and n.up for n in client.nodes())


class Lab:
    def __init__(self, tmp: Path, broker_url: str) -> None:
        self.tmp = tmp
        self.broker_url = broker_url
        self.workers: dict[str, WorkerProcess] = {}
        self.mode_file = tmp / "cli-mode"
        self.mode_file.write_text("stream")
        self.config = tmp / "corral.yaml"
        self.config.write_text(f"priority: [{', '.join(PRIORITY)}]\n")

    def start(self, name: str, backend: str, env: dict[str, str] | None = None) -> None:
        config = yaml_worker(self.tmp / f"{name}.yaml", backend)
        self.workers[name] = start_worker(
            self.broker_url,
            name,
            log_dir=self.tmp,
            env={"CORRAL_CONFIG": str(config), **(env or {})},
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env |= {"CORRAL_BROKER_URL": self.broker_url, "CORRAL_CONFIG": str(self.config)}
        return subprocess.run(
            [sys.executable, "-m", "controller", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO_ROOT,
        )


@pytest.fixture
def lab(broker_url: str, tmp_path: Path) -> Iterator[tuple[Lab, FakeAnthropic, FakeAnthropic]]:
    script = write_fake_cli(tmp_path)
    lab = Lab(tmp_path, broker_url)
    with (
        running_fake_anthropic(api_key=KEY, models=["sim-small"], reply="metered A") as api_a,
        running_fake_anthropic(api_key=KEY, models=["claude-b"], reply="metered B") as api_b,
    ):
        try:
            lab.start("pi", "    - kind: simulated\n")
            lab.start(
                "laptop",
                "    - kind: cli\n      name: claude\n"
                f"      command: ['{sys.executable}', '{script}', '@{lab.mode_file}']\n"
                "      model_flag: --model\n      models: [sim-small]\n",
            )
            for name, api, model in (
                ("cloud-a", api_a, "sim-small"),
                ("cloud-b", api_b, "claude-b"),
            ):
                lab.start(
                    name,
                    f"    - kind: anthropic\n      url: {api.url}\n      models: [{model}]\n",
                    env={"ANTHROPIC_API_KEY": KEY},
                )
            yield lab, api_a, api_b
        finally:
            for worker in lab.workers.values():
                worker.stop()


def test_local_then_subscription_then_metered_then_the_next_model(
    lab: tuple[Lab, FakeAnthropic, FakeAnthropic], broker_url: str
) -> None:
    the_lab, api_a, _api_b = lab
    settings = build_settings(broker_url=broker_url, priority=PRIORITY, route_cache_s=0)
    with CorralClient(settings) as client:
        wait_until(
            lambda: all(node_up(client, n) for n in ("pi", "laptop", "cloud-a", "cloud-b")),
            30,
            "every node to heartbeat",
        )
        started, result = ask(client)
        assert (result.node, result.tier) == ("pi", "local")
        assert started.tier == "local"
        assert result.reason == "sim-small on local pi/simulated: the first choice's cheapest tier"

        # The local node goes down: the laptop's subscription CLI answers.
        the_lab.workers["pi"].stop()
        wait_until(lambda: not node_up(client, "pi"), 30, "pi to be seen down")
        started, result = ask(client)
        assert (result.node, result.backend, result.tier) == ("laptop", "claude", "subscription")
        assert started.tier == "subscription"
        assert "model=sim-small prompt=which tier are you?" in result.text
        assert result.reason is not None and "skipped sim-small local: pi down" in result.reason

        # The CLI as a user sees it: the summary names the tier, and why.
        answer = the_lab.cli("ask", "which tier are you?")
        assert answer.returncode == 0, answer.stderr
        assert "tier subscription" in answer.stderr and "why: " in answer.stderr

        # The subscription's usage window is spent: the job moves on, metered.
        the_lab.mode_file.write_text("ratelimit")
        started, result = ask(client)
        assert (result.node, result.tier, result.text) == ("cloud-a", "metered", "metered A")
        assert result.reason is not None
        assert result.reason.startswith("laptop/claude (subscription) failed: ")
        assert "usage limit reached" in result.reason
        # Its breaker opened at once: the next job skips the CLI without trying it.
        started, result = ask(client)
        assert (result.node, result.tier) == ("cloud-a", "metered")
        assert result.reason is not None
        assert "sim-small subscription: laptop/claude breaker open" in result.reason

        # The metered key's quota is spent too: every route of sim-small is dead, and the job
        # moves on to the next model of the priority list instead of ending.
        api_a.state.fail_status, api_a.state.fail_headers = 429, {}
        api_a.state.fail_message = "You have reached your specified API usage spend limit"
        started, result = ask(client)
        assert (result.node, result.model, result.tier) == ("cloud-b", "claude-b", "metered")
        assert result.text == "metered B"
        assert result.reason is not None and "cloud-a/anthropic (metered) failed" in result.reason
        assert "quota is exhausted" in result.reason
