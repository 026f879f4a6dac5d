"""Within a paid tier, the route whose provider has the most quota left answers first.

Two cloud workers front two fake Anthropic APIs with the same model (two keys, say). Each API
sends rate-limit headers with its answers; each worker reports the share left with its load;
the controller then sends the next job to the one with more headroom, and follows the
headers when they change. Real redis-server, real workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.schemas import DoneEvent, JobResult
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.servers import WorkerProcess, start_worker, wait_until

KEY = "sk-ant-quota-PLANTED-7e21"
MODEL = "claude-quota-test"


def headers(remaining: int, limit: int = 50) -> dict[str, str]:
    return {
        "anthropic-ratelimit-requests-limit": str(limit),
        "anthropic-ratelimit-requests-remaining": str(remaining),
    }


def answer(client: CorralClient, node: str | None = None) -> JobResult:
    for event in client.stream(make_spec("who has quota?", model=MODEL, node=node)):
        if isinstance(event, DoneEvent):
            return event.result
    raise AssertionError("the job ended without a result")


def quota_seen(client: CorralClient, node: str, share: float) -> bool:
    for state in client.nodes():
        if state.name == node:
            return any(b.quota_left == pytest.approx(share) for b in state.info.backends)
    return False


@pytest.fixture
def two_keys(broker_url: str, tmp_path: Path) -> Iterator[tuple[FakeAnthropic, FakeAnthropic]]:
    workers: list[WorkerProcess] = []
    with (
        running_fake_anthropic(api_key=KEY, models=[MODEL], reply="from A") as api_a,
        running_fake_anthropic(api_key=KEY, models=[MODEL], reply="from B") as api_b,
    ):
        try:
            for name, api in (("cloud-a", api_a), ("cloud-b", api_b)):
                config = tmp_path / f"{name}.yaml"
                config.write_text(
                    "worker:\n  backends:\n    - kind: anthropic\n"
                    f"      url: {api.url}\n      models: [{MODEL}]\n"
                )
                workers.append(
                    start_worker(
                        broker_url,
                        name,
                        log_dir=tmp_path,
                        env={"ANTHROPIC_API_KEY": KEY, "CORRAL_CONFIG": str(config)},
                    )
                )
            yield api_a, api_b
        finally:
            for worker in workers:
                worker.stop()


def test_the_route_with_the_most_quota_left_answers_first(
    two_keys: tuple[FakeAnthropic, FakeAnthropic], broker_url: str
) -> None:
    api_a, api_b = two_keys
    api_a.state.ratelimit_headers = headers(remaining=5)
    api_b.state.ratelimit_headers = headers(remaining=40)
    settings = build_settings(broker_url=broker_url, route_cache_s=0)
    with CorralClient(settings) as client:
        wait_until(
            lambda: {"cloud-a", "cloud-b"} <= {n.name for n in client.nodes() if n.up},
            30,
            "both cloud workers to heartbeat",
        )
        # Each key answers once, so each worker has its provider's headers.
        assert answer(client, "cloud-a").text == "from A"
        assert answer(client, "cloud-b").text == "from B"
        wait_until(
            lambda: quota_seen(client, "cloud-a", 0.1) and quota_seen(client, "cloud-b", 0.8),
            30,
            "both workers to report the share of quota left",
        )
        for _ in range(3):
            result = answer(client)
            assert (result.node, result.tier, result.text) == ("cloud-b", "metered", "from B")

        # B's key runs low: A has more left now, and gets the next jobs.
        api_b.state.ratelimit_headers = headers(remaining=1)
        assert answer(client, "cloud-b").text == "from B"
        wait_until(lambda: quota_seen(client, "cloud-b", 0.02), 30, "B's new share")
        result = answer(client)
        assert (result.node, result.text) == ("cloud-a", "from A")
