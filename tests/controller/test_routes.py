"""Route resolution and route files, as pure functions (no Redis): what ``@name`` means."""

from __future__ import annotations

import time

import pytest

from broker.errors import ConfigError, RoutingError, UnknownNode
from broker.schemas import BackendInfo, ModelInfo, NodeInfo
from controller.router import NodeState
from controller.routes import choose_mention, export_routes, make_route, parse_route_file


def state(name: str, kind: str, url: str, *, up: bool = True) -> NodeState:
    backend = BackendInfo(
        name="b", kind=kind, url=url, healthy=True, capacity=1, models=(ModelInfo(name="m"),)
    )
    now = time.time()
    info = NodeInfo(
        name=name,
        version="t",
        backends=(backend,),
        in_flight=0,
        capacity=1,
        heartbeat_interval_s=1,
        started_at=now,
        sent_at=now,
    )
    return NodeState(info=info, up=up)


NODES = [
    state("pi1", "ollama", "http://127.0.0.1:11434"),
    state("pi2", "ollama", "http://10.0.0.2:11434", up=False),
    state("pi3", "ollama", "http://10.0.0.2:11434"),
    state("cloudy", "anthropic", "https://api.anthropic.com"),
]


def test_a_route_goes_to_the_up_node_that_fronts_its_url_with_its_model() -> None:
    route = make_route("Lab", "ollama://10.0.0.2", "llama3")
    mention = choose_mention("lab", route, True, [], NODES, None)
    assert (mention.node, mention.model) == ("pi3", "llama3")  # pi2 fronts it too, but is down
    assert choose_mention("lab", route, True, [], NODES, "qwen").model == "qwen"  # --model wins


def test_a_cloud_scheme_alone_is_served_by_a_worker_of_the_official_endpoint() -> None:
    route = make_route("claude", "anthropic://", "claude-x")
    assert choose_mention("claude", route, True, [], NODES, None).node == "cloudy"
    gem = make_route("gem", "gemini://", "g")
    with pytest.raises(RoutingError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        choose_mention("gem", gem, True, [], NODES, None)


def test_a_route_without_a_model_or_with_routing_off_is_refused_with_the_fix() -> None:
    route = make_route("lab", "ollama://10.0.0.2")
    with pytest.raises(ConfigError, match="@lab --model M"):
        choose_mention("lab", route, True, [], NODES, None)
    with pytest.raises(ConfigError, match="corral route on"):
        choose_mention("lab", route, False, [], NODES, "m")


def test_a_node_name_still_works_and_an_unknown_one_suggests_close_names() -> None:
    assert choose_mention("pi1", None, True, ["coder"], NODES, "m").node == "pi1"
    with pytest.raises(UnknownNode, match="did you mean @coder"):
        choose_mention("codr", None, True, ["coder"], NODES, None)


def test_a_route_file_round_trips_and_refuses_secrets_in_clear() -> None:
    routes = [make_route("a", "openai://", "gpt"), make_route("b", "ollama://pi")]
    for path in ("r.yaml", "r.json"):
        assert parse_route_file(export_routes(routes, path)) == routes
    with pytest.raises(ConfigError, match=r"\$\{VAR\}"):
        parse_route_file("routes:\n  - {name: a, url: 'openai://', token: abc}\n")
    ok = parse_route_file("routes:\n  - {name: a, url: 'openai://', api_key: '${OPENAI_KEY}'}\n")
    assert ok == [make_route("a", "openai://")]
    with pytest.raises(ConfigError, match=r"routes\[0\]: .*unknown route scheme"):
        parse_route_file('{"routes": [{"name": "a", "url": "ftp://x"}]}')


def test_the_route_name_travels_in_the_job_and_shows_in_flower_never_its_url() -> None:
    from broker.schemas import JobAssignment
    from controller.client import make_spec

    spec = make_spec("hi", node="cloudy", model="claude-x", route="claude")
    task = JobAssignment(spec=spec, node="cloudy", backend="b", model="claude-x")
    assert f"job={spec.job_id} route=claude node=cloudy" in task.argsrepr()
    plain = JobAssignment(spec=make_spec("hi"), node="pi1", backend="b", model="m")
    assert "route=" not in plain.argsrepr()
