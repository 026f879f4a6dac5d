"""``model@route`` through the gateway: it reads the route table once per ``route_cache_s``
(no Redis round trip per request), and a route added or removed with ``corral route`` in
another process still changes its answers within that time."""

from __future__ import annotations

import time

import httpx

from controller.cli import ExitCode
from tests.controller.gateway.conftest import Gateway
from tests.support.cli import corral

ROUTE_CACHE_S = 0.5
"""The gateway fixture's ``route_cache_s`` (the default)."""
MARGIN_S = 1.0
"""For a loaded machine: a request's own time, the poll's pace."""


def ask(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def seconds_until(gateway: Gateway, model: str, status: int, timeout_s: float = 10) -> float:
    """How long until a request for ``model`` is answered with ``status``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if ask(gateway, model).status_code == status:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{model} never answered {status}")


def test_a_route_added_or_removed_elsewhere_takes_effect_within_the_cache_time(
    gateway: Gateway, module_broker_url: str
) -> None:
    unknown = ask(gateway, "sim-small@later")
    assert unknown.status_code == 404 and "no route of that name" in unknown.text

    # A route no worker serves: once the gateway sees it, the answer is a 503 naming it.
    added = corral(module_broker_url, "route", "add", "later", "ollama://127.0.0.1:9", "sim-small")
    assert added.returncode == ExitCode.OK, added.stderr
    assert seconds_until(gateway, "sim-small@later", 503) <= ROUTE_CACHE_S + MARGIN_S
    assert "route @later" in ask(gateway, "sim-small@later").text

    assert corral(module_broker_url, "route", "rm", "later").returncode == ExitCode.OK
    assert seconds_until(gateway, "sim-small@later", 404) <= ROUTE_CACHE_S + MARGIN_S


def test_a_node_named_with_at_still_serves_while_the_route_table_is_cached(
    gateway: Gateway,
) -> None:
    for _ in range(3):
        answer = ask(gateway, "sim-small@beta")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-corral-node"] == "beta"
