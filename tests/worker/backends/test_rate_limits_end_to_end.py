"""Rate limits across the cluster: real redis-server, real workers, the real CLI, a fake
Anthropic Messages API (which counts every request that reaches it).

- Two workers share one configured limit (rpm 2): the third call in a minute is never sent,
  wherever it runs; a controller configured with the same limit routes nothing there.
- A provider's 429 with Retry-After 2 holds that backend's breaker open for about 2 s: a second
  controller sends it nothing meanwhile; after it, one probe job closes it.
- A spend-limit 429 (no Retry-After) marks the backend's quota exhausted, shown by
  ``corral nodes``.
- The provider's rate-limit headers are recorded per node and backend and shown by
  ``corral nodes``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker import names
from broker.errors import NoNodeAvailable
from broker.settings import build_settings
from controller.breaker import BreakerPhase, BreakerState, parse_breakers
from controller.cli.common import ExitCode
from controller.client import CorralClient, make_spec
from tests.fakes.fake_anthropic import FakeAnthropic, running_fake_anthropic
from tests.support.cli import corral as run_cli
from tests.support.servers import WorkerProcess, start_worker, wait_until

KEY = "sk-ant-limits-PLANTED-51c0"
MODEL = "claude-limits-test"
REPLY = "Within the limit."


def flat(text: str) -> str:
    """Whitespace folded: rich wraps its output when it is not a terminal."""
    return " ".join(text.split())


def config_file(tmp_path: Path, name: str, fake: FakeAnthropic, limits: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"{limits}worker:\n  backends:\n    - kind: anthropic\n      url: {fake.url}\n"
        f"      models: [{MODEL}]\n"
    )
    return path


def cloud_worker(broker_url: str, name: str, config: Path, log_dir: Path) -> WorkerProcess:
    return start_worker(
        broker_url,
        name,
        log_dir=log_dir,
        env={"ANTHROPIC_API_KEY": KEY, "CORRAL_CONFIG": str(config)},
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def wait_for_room_in_the_minute(broker_url: str, needed_s: float) -> None:
    """The limits count per minute of Redis's clock: start where ``needed_s`` seconds of it
    remain, so the test's calls all fall in one window."""
    client = redis.Redis.from_url(broker_url)
    seconds, _ = client.time()
    client.close()
    into_minute = seconds % 60
    if 60 - into_minute < needed_s:
        time.sleep(60 - into_minute + 0.2)


LIMITS = {"anthropic": {"rpm": 2}}
WORKERS = ("w1", "w2")


def test_two_workers_share_one_limit_and_the_third_call_is_never_sent(
    broker_url: str, tmp_path: Path
) -> None:
    limits = "limits:\n  anthropic:\n    rpm: 2\n"
    with running_fake_anthropic(api_key=KEY, models=[MODEL], reply=REPLY) as fake:
        workers = [
            cloud_worker(broker_url, name, config_file(tmp_path, name, fake, limits), tmp_path)
            for name in WORKERS
        ]
        plain = CorralClient(build_settings(broker_url=broker_url, route_cache_s=0))
        limited = CorralClient(
            build_settings(broker_url=broker_url, route_cache_s=0, limits=LIMITS)
        )
        try:
            wait_for_room_in_the_minute(broker_url, 30)
            # Pinned, so each worker makes one of the calls; this controller has no limit
            # configured: only the workers' shared counter stops the third (asked with the
            # CLI, as a user would).
            answers = [list(plain.stream(make_spec("hi", node=n, model=MODEL))) for n in WORKERS]
            third = run_cli(broker_url, "ask", "--json", "--node", "w1", "--model", MODEL, "hi")
            calls_made = fake.state.message_requests
            # A controller that knows the limit does not even send the job.
            with pytest.raises(NoNodeAvailable) as routed:
                limited.choose(make_spec("hi again", model=MODEL))
            wait_until(
                lambda: all(
                    plain.redis.exists(names.provider_limits_key(n, "anthropic")) for n in WORKERS
                ),
                10,
                "both workers' heartbeats to record their provider's headers",
            )
            shown = run_cli(broker_url, "nodes", env={"CORRAL_LIMITS": json.dumps(LIMITS)})
            as_json = run_cli(broker_url, "nodes", "--json")
        finally:
            plain.close()
            limited.close()
            for worker in workers:
                worker.stop()

    assert [a[-1].type for a in answers] == ["done", "done"]
    assert third.returncode == ExitCode.BACKEND
    assert calls_made == 2  # the fake never saw the third call
    final = json_events(third.stdout)[-1]
    assert final["type"] == "error" and final["code"] == "rate_limited"
    assert "anthropic is at its configured rpm of 2" in final["message"]
    assert 0 < final["retry_after"] <= 60  # the minute's end
    assert final["limit"] == "anthropic"  # corral's own refusal: no breaker opened for it
    assert not redis.Redis.from_url(broker_url).exists(names.BREAKERS_HASH)

    assert "w1/anthropic: anthropic is at its configured rpm of 2" in str(routed.value)
    assert "w2/anthropic: anthropic is at its configured rpm of 2" in str(routed.value)
    assert routed.value.retry_after is not None and 0 < routed.value.retry_after <= 60
    assert fake.state.message_requests == 2

    assert shown.returncode == 0, shown.stderr
    out = flat(shown.stdout)
    assert "limit anthropic: 2/2 requests this minute" in out
    # The fake's anthropic-ratelimit-* headers of the last answer, per node and backend.
    assert "w1/anthropic: provider says requests 49/50 left" in out
    assert "w2/anthropic: provider says requests 49/50 left" in out
    assert KEY not in shown.stdout + shown.stderr
    recorded = {row["name"]: row["provider_limits"] for row in json_events(as_json.stdout)}
    assert recorded["w1"]["anthropic"]["anthropic-ratelimit-requests-remaining"] == "49"


@pytest.fixture(scope="module")
def held_node(
    module_broker_url: str, module_log_dir: Path
) -> Iterator[tuple[FakeAnthropic, CorralClient, CorralClient]]:
    """One cloud worker, and two controllers (separate clients, sharing only Redis)."""
    with running_fake_anthropic(api_key=KEY, models=[MODEL], reply=REPLY) as fake:
        config = config_file(module_log_dir, "held", fake)
        worker = cloud_worker(module_broker_url, "held", config, module_log_dir)
        settings = build_settings(broker_url=module_broker_url, route_cache_s=0)
        try:
            with CorralClient(settings) as first, CorralClient(settings) as second:
                yield fake, first, second
        finally:
            worker.stop()


def breaker_entry(client: CorralClient) -> BreakerState | None:
    entries = client.redis.hgetall(names.BREAKERS_HASH)
    return parse_breakers([part for pair in entries.items() for part in pair]).get("held/anthropic")


def test_a_429_with_retry_after_holds_the_backend_for_that_long_for_every_controller(
    held_node: tuple[FakeAnthropic, CorralClient, CorralClient],
) -> None:
    fake, first, second = held_node
    fake.state.fail_status, fake.state.fail_headers = 429, {"retry-after": "2"}
    fake.state.fail_message = "Number of requests has exceeded your per-minute rate limit"
    events = list(first.stream(make_spec("hello", model=MODEL)))
    fake.state.fail_status, fake.state.fail_headers = None, {}
    calls_after_429 = fake.state.message_requests

    errors = [e for e in events if e.type == "error"]
    assert errors and errors[-1].final and errors[-1].code == "rate_limited"
    assert errors[-1].retry_after == 2  # carried to the client, for the gateway's Retry-After
    state = breaker_entry(first)
    assert state is not None and state.reason == "rate_limited"
    assert state.held_until - state.opened_at == pytest.approx(2, abs=0.01)

    # The other controller sends nothing there while the hold lasts, and says why.
    with pytest.raises(NoNodeAvailable, match="rate limited by its provider"):
        second.choose(make_spec("meanwhile", model=MODEL))

    def held() -> bool:  # read without taking the half-open probe's permit
        phases = second.breaker_phases(second.cluster())
        return phases.get("held/anthropic") is BreakerPhase.OPEN

    wait_until(lambda: not held(), 10, "the hold to run out")
    seconds, micros = second.redis.time()
    assert seconds + micros / 1e6 >= state.held_until
    # One probe job goes through and closes the breaker.
    done = list(second.stream(make_spec("after the wait", model=MODEL)))
    assert done[-1].type == "done" and done[-1].result.text == REPLY
    assert fake.state.message_requests == calls_after_429 + 1
    assert breaker_entry(second) is None


def test_a_spend_limit_429_marks_the_backend_quota_exhausted(
    held_node: tuple[FakeAnthropic, CorralClient, CorralClient],
) -> None:
    fake, first, second = held_node
    fake.state.fail_status, fake.state.fail_headers = 429, {}
    fake.state.fail_message = "You have reached your specified API usage spend limit"
    try:
        events = list(first.stream(make_spec("hello", model=MODEL)))
    finally:
        fake.state.fail_status = None
    final = events[-1]
    assert final.type == "error" and final.final and final.code == "quota_exhausted"
    assert "quota is exhausted" in final.message
    state = breaker_entry(first)
    assert state is not None and state.reason == "quota_exhausted"
    # No reset time given: the configured default (quota_cooldown_s, an hour).
    assert state.held_until - state.opened_at == pytest.approx(3600, abs=0.01)
    nodes = run_cli(second.settings.broker_url.get_secret_value(), "nodes")
    assert "quota exhausted (60m)" in flat(nodes.stdout)
    assert "held/anthropic: quota exhausted, as its provider said; no jobs go there for 60m" in (
        flat(nodes.stdout)
    )
    with pytest.raises(NoNodeAvailable, match="quota exhausted by its provider"):
        second.choose(make_spec("meanwhile", model=MODEL))
    url = second.settings.broker_url.get_secret_value()
    origin = fake.url.removeprefix("http://")
    added = run_cli(url, "route", "add", "claude", f"anthropic+http://{origin}", MODEL)
    assert added.returncode == 0, added.stderr
    routes = flat(run_cli(url, "route", "list").stdout)
    assert "served by held/anthropic; held/anthropic: quota exhausted (60m)" in routes
    assert "held/anthropic: provider says requests 49/50 left" in routes
    second.breakers.reset("held/anthropic")
