"""Route resolution and route files, as pure functions (no Redis): what ``@name`` means."""

from __future__ import annotations

import time

import pytest

from broker.errors import ConfigError, NoNodeAvailable, RoutingError, UnknownModel, UnknownNode
from broker.schemas import BackendInfo, JobSpec, ModelInfo, NodeInfo, ToolDefinition, ToolFunction
from controller.client import make_spec
from controller.router import NodeState, candidates_for
from controller.routes import (
    Mention,
    choose_mention,
    export_routes,
    make_route,
    parse_route_file,
    route_servers,
)


def backend(name: str, kind: str, url: str, model: str = "m") -> BackendInfo:
    return BackendInfo(
        name=name, kind=kind, url=url, healthy=True, capacity=2, models=(ModelInfo(name=model),)
    )


def state(
    name: str,
    kind: str = "ollama",
    url: str = "http://10.9.9.9:11434",
    *,
    up: bool = True,
    model: str = "m",
    more: tuple[BackendInfo, ...] = (),
    cloud: frozenset[str] = frozenset(),
    in_flight: int = 0,
) -> NodeState:
    now = time.time()
    info = NodeInfo(
        name=name,
        version="t",
        backends=(backend("b", kind, url, model), *more),
        in_flight=in_flight,
        capacity=4,
        heartbeat_interval_s=1,
        started_at=now,
        sent_at=now,
        cloud_providers=cloud,
    )
    return NodeState(info=info, up=up)


NODES = [
    state("pi1", "ollama", "http://127.0.0.1:11434"),
    state("pi2", "ollama", "http://10.0.0.2:11434", up=False),
    state("pi3", "ollama", "http://10.0.0.2:11434", model="llama3"),
    state("cloudy", "anthropic", "https://api.anthropic.com"),
]


def spec_for(mention: Mention) -> JobSpec:
    return make_spec(
        "hi",
        node=mention.node,
        model=mention.model,
        route=mention.route_name,
        route_url=mention.route_url,
    )


def test_a_route_goes_to_the_up_node_that_fronts_its_url_with_its_model() -> None:
    route = make_route("Lab", "ollama://10.0.0.2", "llama3")
    mention = choose_mention("lab", route, True, [], NODES, None)
    assert (mention.node, mention.model, mention.route_url) == (None, "llama3", route.url)
    ranked = candidates_for(spec_for(mention), NODES)
    # pi2 fronts it too, but is down
    assert [(c.node, c.backend, c.model) for c in ranked] == [("pi3", "b", "llama3")]
    qwen = choose_mention("lab", route, True, [], NODES, "qwen")
    assert qwen.model == "qwen"  # --model wins
    # A local server must hold it: nothing is sent, and the user sees what it has.
    with pytest.raises(UnknownModel, match=r"'qwen' is not on http://10.0.0.2:11434.*llama3"):
        candidates_for(spec_for(qwen), NODES)


def test_a_cloud_scheme_alone_is_served_by_a_worker_of_the_official_endpoint() -> None:
    route = make_route("claude", "anthropic://", "claude-x")
    mention = choose_mention("claude", route, True, [], NODES, None)
    assert [c.node for c in candidates_for(spec_for(mention), NODES)] == ["cloudy"]
    gem = make_route("gem", "gemini://", "g")
    with pytest.raises(RoutingError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        choose_mention("gem", gem, True, [], NODES, None)


CLOUD_NODES = [
    state("busy", cloud=frozenset({"anthropic", "google"}), in_flight=3),
    state("idle", cloud=frozenset({"anthropic"})),
    state("keyless", cloud=frozenset({"openai-cloud"})),
    # Holds a model of the route's name on another backend: never a candidate for the route.
    state("holder", model="claude-x"),
    state("gone", cloud=frozenset({"anthropic"}), up=False),
]


def test_a_cloud_route_goes_to_any_up_worker_advertising_its_provider_by_load() -> None:
    route = make_route("claude", "anthropic+http://127.0.0.1:9999", "claude-x")
    mention = choose_mention("claude", route, True, [], CLOUD_NODES, None)
    spec = spec_for(mention)
    ranked = candidates_for(spec, CLOUD_NODES)
    assert [(c.node, c.backend, c.model) for c in ranked] == [
        ("idle", "cloud-anthropic", "claude-x"),
        ("busy", "cloud-anthropic", "claude-x"),
    ]
    # Moved on before the first token: the next advertising node, then nothing (not "holder").
    assert [c.node for c in candidates_for(spec, CLOUD_NODES, exclude_nodes={"idle"})] == ["busy"]
    with pytest.raises(NoNodeAvailable, match="no worker serving it is left"):
        candidates_for(spec, CLOUD_NODES, exclude_nodes={"idle", "busy"})
    # A breaker open on one node's on-demand adapter keeps the job off that node only.
    assert [c.node for c in candidates_for(spec, CLOUD_NODES, {"idle/cloud-anthropic"})] == ["busy"]
    servers = [s.label for s in route_servers(route, CLOUD_NODES)]
    assert servers == [
        "busy/cloud-anthropic (--cloud)",
        "idle/cloud-anthropic (--cloud)",
        "gone/cloud-anthropic (--cloud)",
    ]


def test_a_cloud_route_no_worker_can_serve_names_the_key_and_the_cloud_flag() -> None:
    route = make_route("mis", "mistral://", "mistral-small")
    with pytest.raises(RoutingError, match=r"corral worker --cloud.*MISTRAL_API_KEY"):
        choose_mention("mis", route, True, [], CLOUD_NODES, None)
    down = [state("gone", cloud=frozenset({"mistral"}), up=False)]
    with pytest.raises(RoutingError, match="MISTRAL_API_KEY"):
        choose_mention("mis", route, True, [], down, None)
    # Every server gone between resolution and routing: the router says so too.
    spec = make_spec("hi", model="mistral-small", route="mis", route_url="mistral://")
    with pytest.raises(NoNodeAvailable, match=r"@mis: every worker that serves it is down"):
        candidates_for(spec, down)


def test_a_route_pins_the_backend_at_its_url_when_the_node_fronts_two_with_its_model() -> None:
    second = backend("gpu", "ollama", "http://10.0.0.7:11434", "llama3")
    node = state("box", url="http://10.0.0.6:11434", model="llama3", more=(second,))
    for url, expected in (("ollama://10.0.0.7", "gpu"), ("ollama://10.0.0.6", "b")):
        spec = make_spec("hi", model="llama3", route="r", route_url=url)
        assert [c.backend for c in candidates_for(spec, [node])] == [expected]


def test_a_route_job_with_tools_goes_only_to_a_model_with_the_capability() -> None:
    tools = ToolDefinition(function=ToolFunction(name="now"))

    def with_tools(route_url: str, model: str) -> JobSpec:
        spec = make_spec("hi", model=model, route="r", route_url=route_url)
        spec = spec.model_copy(update={"tools": (tools,)})
        return spec.model_copy(update={"tags": spec.needs()})  # as the gateway asks

    plain = state("pi", model="llama3")
    toolbox = BackendInfo(
        name="b",
        kind="ollama",
        url="http://10.9.9.9:11434",
        healthy=True,
        capacity=2,
        models=(ModelInfo(name="llama3", capabilities=frozenset({"chat", "tools"})),),
    )
    able = NodeState(
        info=plain.info.model_copy(update={"name": "gpu", "backends": (toolbox,)}), up=True
    )
    spec = with_tools("ollama://10.9.9.9", "llama3")
    with pytest.raises(NoNodeAvailable, match="'llama3' there has no tools capability"):
        candidates_for(spec, [plain])
    assert [c.node for c in candidates_for(spec, [plain, able])] == ["gpu"]
    # A provider's model no node lists: the on-demand adapter may take it (the provider says).
    cloud = with_tools("anthropic://", "claude-new")
    assert [c.node for c in candidates_for(cloud, CLOUD_NODES)] == ["idle", "busy"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_localhost_127_0_0_1_and_ipv6_loopback_are_one_host(host: str) -> None:
    nodes = [
        state("a", url="http://localhost:11434"),
        state("b", url="http://[::1]:11434"),
        state("c", url="http://127.0.0.1:11434"),
        state("d", url="http://127.0.0.1:11435"),
    ]
    route = make_route("here", f"ollama://{host}:11434", "m")
    assert [s.state.name for s in route_servers(route, nodes)] == ["a", "b", "c"]


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

    spec = make_spec("hi", model="claude-x", route="claude", route_url="anthropic+http://h:1")
    task = JobAssignment(spec=spec, node="cloudy", backend="b", model="claude-x")
    assert f"job={spec.job_id} route=claude node=cloudy" in task.argsrepr()
    assert "anthropic" not in task.argsrepr()
    plain = JobAssignment(spec=make_spec("hi"), node="pi1", backend="b", model="m")
    assert "route=" not in plain.argsrepr()


@pytest.mark.parametrize(
    "url", ["openai://user:sk-secret-9@proxy.lan", "ollama://pi?key=sk-secret-9", "ftp://x"]
)
def test_a_job_whose_route_url_could_carry_a_secret_is_refused_without_echoing_it(
    url: str,
) -> None:
    with pytest.raises(ConfigError) as refused:
        make_spec("hi", model="m", route="r", route_url=url)
    assert "sk-secret-9" not in str(refused.value)
