"""The gateway's Prometheus metrics, read back as Prometheus would parse them, and its
request body limit."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.controller.gateway.conftest import Gateway


def samples(gateway: Gateway) -> dict[str, list[tuple[dict[str, str], float]]]:
    answer = httpx.get(gateway.url + "/metrics", timeout=5)
    assert answer.status_code == 200
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample_labels, value in found.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def test_jobs_latencies_tokens_and_streams_are_counted(gateway: Gateway) -> None:
    before = samples(gateway)
    messages = [{"role": "user", "content": "count me"}]
    for stream in (True, False):
        body = {"model": "sim-small@alpha", "messages": messages, "stream": stream}
        assert httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=30).is_success
    body = {"model": "sim-small@beta", "messages": messages, "stream": False}
    assert httpx.post(gateway.url + "/api/chat", json=body, timeout=30).is_success
    body = {"model": "no-such-model", "messages": messages}
    assert httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=30).status_code == 404

    after = samples(gateway)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    ok = {"model": "sim-small", "outcome": "ok"}
    assert grew("corral_gateway_jobs_total", api="openai", node="alpha", **ok) == 2
    assert grew("corral_gateway_jobs_total", api="ollama", node="beta", **ok) == 1
    assert grew("corral_gateway_refused_requests_total", api="openai", status="404") == 1
    ttft = "corral_gateway_time_to_first_token_seconds_count"
    assert grew(ttft, api="openai", node="alpha") == 2
    assert grew("corral_gateway_request_duration_seconds_count", api="ollama") == 1
    assert grew("corral_gateway_tokens_total", node="alpha", kind="completion") > 0
    assert total(after, "corral_gateway_in_flight_streams") == 0


def test_a_request_body_over_the_limit_is_a_413(gateway: Gateway) -> None:
    body = b'{"model": "sim-small", "messages": [], "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    answer = httpx.post(
        gateway.v1 + "/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413
    assert "over the gateway's limit" in answer.json()["error"]["message"]
