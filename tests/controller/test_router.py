"""The router: a pure function from a job and the node list to ranked candidates."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import NoNodeAvailable, UnknownModel, UnknownNode
from broker.schemas import BackendInfo, ChatMessage, JobSpec, ModelInfo, NodeInfo
from controller.node_index import NodeIndex
from controller.router import NodeState, candidates_for, rank_candidates, rank_candidates_by_scan

MODELS = ["llama3.1:8b", "qwen2.5-coder:7b", "phi3:mini", "nomic-embed-text"]
TAGS = ["code", "gpu", "embed", "pi"]
NODE_NAMES = ["pi1", "pi2", "gpu1", "nuc", "laptop"]


def node(
    name: str,
    models: dict[str, bool],
    *,
    capabilities: dict[str, frozenset[str]] | None = None,
    latency_ms: float | None = None,
    up: bool = True,
    tags: frozenset[str] = frozenset(),
    in_flight: int = 0,
    capacity: int = 2,
    queued: int = 0,
    healthy: bool = True,
) -> NodeState:
    backend = BackendInfo(
        name="ollama",
        kind="ollama",
        url="http://127.0.0.1:11434",
        healthy=healthy,
        capacity=capacity,
        latency_ms=latency_ms,
        models=tuple(
            ModelInfo(name=m, loaded=loaded, capabilities=(capabilities or {}).get(m, frozenset()))
            for m, loaded in models.items()
        ),
    )
    info = NodeInfo(
        name=name,
        version="0",
        tags=tags,
        backends=(backend,),
        in_flight=in_flight,
        capacity=capacity,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=time.time(),
    )
    return NodeState(info=info, up=up, queued=queued)


def job(
    pin: str | None = None, model: str | None = None, tags: frozenset[str] = frozenset()
) -> JobSpec:
    return JobSpec(
        job_id="job-0001",
        messages=(ChatMessage(role="user", content="hi"),),
        node=pin,
        model=model,
        tags=tags,
        created_at=0,
    )


def test_prefers_the_node_with_the_model_already_loaded() -> None:
    nodes = [node("idle", {"llama3.1:8b": False}), node("busy", {"llama3.1:8b": True}, in_flight=1)]
    assert candidates_for(job(model="llama3.1:8b"), nodes)[0].node == "busy"


def test_then_the_least_loaded_node() -> None:
    nodes = [
        node("a", {"phi3:mini": True}, in_flight=2, capacity=4),
        node("b", {"phi3:mini": True}, in_flight=0, queued=1, capacity=4),
        node("c", {"phi3:mini": True}, in_flight=3, capacity=4),
    ]
    assert [c.node for c in candidates_for(job(model="phi3:mini"), nodes)] == ["b", "a", "c"]


def test_a_pinned_node_is_picked_even_if_another_is_better() -> None:
    nodes = [node("pi2", {"phi3:mini": False}, in_flight=1), node("gpu1", {"phi3:mini": True})]
    assert [c.node for c in candidates_for(job(pin="pi2"), nodes)] == ["pi2"]


def test_no_model_named_uses_a_loaded_model_of_the_node() -> None:
    candidate = candidates_for(job(), [node("pi1", {"phi3:mini": False, "llama3.1:8b": True})])[0]
    assert candidate.model == "llama3.1:8b"
    assert candidate.model_loaded


def test_tags_must_all_be_present() -> None:
    nodes = [
        node("a", {"m": True}, tags=frozenset({"code"})),
        node("b", {"m": True}, tags=frozenset({"code", "gpu"})),
    ]
    assert [c.node for c in candidates_for(job(tags=frozenset({"code", "gpu"})), nodes)] == ["b"]


def test_unknown_node_names_the_known_nodes() -> None:
    with pytest.raises(UnknownNode, match=r"no node named 'pi9' \(known nodes: pi1, pi2\)"):
        candidates_for(job(pin="pi9"), [node("pi1", {"m": True}), node("pi2", {"m": True})])


def test_a_pinned_node_that_is_down_says_so() -> None:
    with pytest.raises(NoNodeAvailable, match="node 'pi2' is down"):
        candidates_for(
            job(pin="pi2"), [node("pi2", {"m": True}, up=False), node("pi1", {"m": True})]
        )


def test_unknown_model_lists_what_exists() -> None:
    with pytest.raises(
        UnknownModel, match=r"'gpt-9' is not installed on any node \(available: m, n\)"
    ):
        candidates_for(job(model="gpt-9"), [node("a", {"m": True}), node("b", {"n": False})])


def test_no_node_up() -> None:
    with pytest.raises(NoNodeAvailable, match="no node is up"):
        candidates_for(job(), [])
    with pytest.raises(NoNodeAvailable, match="every matching node is down"):
        candidates_for(job(), [node("a", {"m": True}, up=False)])


def test_missing_tag_is_named() -> None:
    with pytest.raises(NoNodeAvailable, match="no up node or model has the tags gpu"):
        candidates_for(
            job(tags=frozenset({"gpu"})), [node("a", {"m": True}, tags=frozenset({"code"}))]
        )


def test_unhealthy_backend_is_skipped() -> None:
    nodes = [node("a", {"m": True}, healthy=False), node("b", {"m": False})]
    assert [c.node for c in candidates_for(job(model="m"), nodes)] == ["b"]


def test_open_breaker_excludes_a_node() -> None:
    nodes = [node("a", {"m": True}), node("b", {"m": True})]
    assert [c.node for c in rank_candidates(job(), nodes, blocked={"a"})] == ["b"]


# --- properties over generated clusters ------------------------------------------------------

node_states = st.builds(
    node,
    name=st.sampled_from(NODE_NAMES),
    models=st.dictionaries(st.sampled_from(MODELS), st.booleans(), max_size=4),
    up=st.booleans(),
    tags=st.frozensets(st.sampled_from(TAGS), max_size=3),
    in_flight=st.integers(0, 4),
    capacity=st.integers(1, 4),
    queued=st.integers(0, 5),
    healthy=st.booleans(),
)
clusters = st.lists(node_states, max_size=6, unique_by=lambda n: n.name)
jobs = st.builds(
    job,
    pin=st.none() | st.sampled_from(NODE_NAMES),
    model=st.none() | st.sampled_from(MODELS),
    tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
)


def test_an_alias_tries_its_models_in_order() -> None:
    nodes = [node("pi1", {"small:1b": True}), node("gpu1", {"big:70b": False})]
    aliases = {"coder": ["big:70b", "small:1b"]}
    ranked = rank_candidates(job(model="coder"), nodes, aliases=aliases)
    assert [(c.node, c.model) for c in ranked] == [("gpu1", "big:70b"), ("pi1", "small:1b")]


def test_an_alias_none_of_whose_models_exists_names_them() -> None:
    with pytest.raises(UnknownModel, match=r"none of alias 'coder'.s models \(a:1b, b:2b\)"):
        candidates_for(
            job(model="coder"), [node("pi1", {"x:1b": True})], aliases={"coder": ["a:1b", "b:2b"]}
        )


def test_a_model_name_without_tag_means_latest() -> None:
    (candidate,) = rank_candidates(job(model="llama3"), [node("pi1", {"llama3:latest": False})])
    assert candidate.model == "llama3:latest"


def test_a_vision_model_gives_its_node_the_vision_tag() -> None:
    caps = {"llava:7b": frozenset({"chat", "vision"}), "llama3:8b": frozenset({"chat"})}
    nodes = [node("pi1", {"llama3:8b": True, "llava:7b": False}, capabilities=caps)]
    (candidate,) = rank_candidates(job(tags=frozenset({"vision"})), nodes)
    assert candidate.model == "llava:7b"


def test_an_embedding_only_model_never_answers_a_chat_job() -> None:
    caps = {"nomic-embed-text": frozenset({"embed"})}
    nodes = [node("pi1", {"nomic-embed-text": True}, capabilities=caps)]
    assert not rank_candidates(job(), nodes)
    with pytest.raises(NoNodeAvailable):
        candidates_for(job(), nodes)
    with pytest.raises(NoNodeAvailable, match="only models that cannot chat have the tags embed"):
        candidates_for(job(tags=frozenset({"embed"})), nodes)


def test_the_session_node_goes_first_while_it_can_serve() -> None:
    nodes = [node("pi1", {"m": True}), node("pi2", {"m": True}, in_flight=1)]
    assert rank_candidates(job(), nodes, sticky_node="pi2")[0].node == "pi2"
    nodes[1] = node("pi2", {"m": True}, up=False)
    assert rank_candidates(job(), nodes, sticky_node="pi2")[0].node == "pi1"


def test_lower_latency_breaks_a_tie() -> None:
    nodes = [node("pi1", {"m": True}, latency_ms=900), node("pi2", {"m": True}, latency_ms=40)]
    assert rank_candidates(job(), nodes)[0].node == "pi2"


def test_an_open_backend_breaker_is_named_when_nothing_is_left() -> None:
    with pytest.raises(NoNodeAvailable, match="pi1/ollama: circuit breaker open"):
        candidates_for(job(), [node("pi1", {"m": True})], blocked={"pi1/ollama"})


@settings(max_examples=300, deadline=None)
@given(spec=jobs, nodes=clusters)
def test_never_picks_a_down_node_or_one_without_the_model(
    spec: JobSpec, nodes: list[NodeState]
) -> None:
    by_name = {n.name: n for n in nodes}
    for candidate in rank_candidates(spec, nodes):
        chosen = by_name[candidate.node]
        assert chosen.up
        assert candidate.model in chosen.info.model_names()
        if spec.model is not None:
            assert candidate.model == spec.model
        if spec.node is not None:
            assert candidate.node == spec.node
        assert spec.tags <= chosen.info.tags


@settings(max_examples=300, deadline=None)
@given(spec=jobs, nodes=clusters)
def test_a_loaded_candidate_always_ranks_before_an_unloaded_one(
    spec: JobSpec, nodes: list[NodeState]
) -> None:
    loaded_flags = [c.model_loaded for c in rank_candidates(spec, nodes)]
    assert loaded_flags == sorted(loaded_flags, reverse=True)


@settings(max_examples=300, deadline=None)
@given(spec=jobs, nodes=clusters)
def test_empty_answer_always_comes_with_a_reason(spec: JobSpec, nodes: list[NodeState]) -> None:
    if rank_candidates(spec, nodes):
        assert candidates_for(spec, nodes)
    else:
        with pytest.raises((UnknownNode, UnknownModel, NoNodeAvailable)):
            candidates_for(spec, nodes)


# --- the index gives the scan's answers ----------------------------------------------------

ALIASES = {"coder": ["qwen2.5-coder:7b", "llama3.1"], "any-small": ["phi3:mini", "phi3:mini"]}
targets = st.frozensets(
    st.sampled_from(NODE_NAMES) | st.builds(lambda n: f"{n}/ollama", st.sampled_from(NODE_NAMES)),
    max_size=3,
)
aliased_jobs = st.builds(
    job,
    pin=st.none() | st.sampled_from(NODE_NAMES),
    model=st.none() | st.sampled_from([*MODELS, "llama3.1", "coder", "any-small", "gpt-9"]),
    tags=st.frozensets(st.sampled_from([*TAGS, "vision", "tools", "chat"]), max_size=2),
)
capability_maps = st.dictionaries(
    st.sampled_from(MODELS),
    st.frozensets(st.sampled_from(["chat", "embed", "vision", "tools"]), max_size=2),
    max_size=4,
)
rich_nodes = st.builds(
    node,
    name=st.sampled_from(NODE_NAMES),
    models=st.dictionaries(
        st.sampled_from([*MODELS, "llama3.1:latest", "phi3:mini"]), st.booleans(), max_size=5
    ),
    capabilities=capability_maps,
    latency_ms=st.none() | st.sampled_from([10.0, 40.0]),
    up=st.booleans(),
    tags=st.frozensets(st.sampled_from([*TAGS, "chat"]), max_size=3),
    in_flight=st.integers(0, 4),
    capacity=st.integers(1, 4),
    queued=st.integers(0, 5),
    healthy=st.booleans(),
)


def with_second_backend(
    state: NodeState, kind: str | None, healthy: bool, latency_ms: float | None
) -> NodeState:
    """``state`` with a second backend of ``kind`` (None: none) holding the same models: a
    node with a local server and a subscription or a metered API, in another tier, or two
    local servers tying on everything but their names."""
    if kind is None:
        return state
    first = state.info.backends[0]
    second = first.model_copy(
        update={"name": f"{kind}-2", "kind": kind, "healthy": healthy, "latency_ms": latency_ms}
    )
    info = state.info.model_copy(update={"backends": (first, second)})
    return replace(state, info=info)


fleet_nodes = st.builds(
    with_second_backend,
    rich_nodes,
    st.none() | st.sampled_from(["ollama", "cli", "anthropic"]),
    st.booleans(),
    st.none() | st.sampled_from([10.0, 40.0]),
)


@settings(max_examples=500, deadline=None)
@given(
    spec=aliased_jobs,
    earlier=aliased_jobs,
    nodes=st.lists(fleet_nodes, max_size=6, unique_by=lambda n: n.name),
    before=st.lists(fleet_nodes, max_size=6, unique_by=lambda n: n.name),
    blocked=targets,
    exclude=st.frozensets(st.sampled_from(NODE_NAMES), max_size=2),
    sticky=st.none() | st.sampled_from(NODE_NAMES),
    sent=st.dictionaries(st.sampled_from(NODE_NAMES), st.integers(0, 3), max_size=3),
)
def test_the_index_answers_as_the_scan_does(
    spec: JobSpec,
    earlier: JobSpec,
    nodes: list[NodeState],
    before: list[NodeState],
    blocked: frozenset[str],
    exclude: frozenset[str],
    sticky: str | None,
    sent: dict[str, int],
) -> None:
    counted = [replace(n, queued=n.queued + sent.get(n.name, 0)) for n in nodes]
    options = {"aliases": ALIASES, "exclude_nodes": exclude, "sticky_node": sticky}
    expected = rank_candidates_by_scan(spec, counted, blocked, **options)
    # The previous view: some of these very nodes, some others; the jobs it served left their
    # rankings, which a new view patches for what changed.
    shared = nodes[1:]
    taken = {n.name for n in shared}
    previous = NodeIndex([*shared, *(n for n in before if n.name not in taken)])
    for asked in (spec, earlier):
        rank_candidates(asked, previous, aliases=ALIASES)[:1]
    # A view between, asked nothing: the next one patches what it never grouped.
    kept = {n.name for n in shared[1:]}
    between = NodeIndex(
        [*shared[1:], *(n for n in before if n.name not in kept)], previous=previous
    )
    views = (
        NodeIndex(nodes),
        NodeIndex(nodes, previous=previous),
        NodeIndex(nodes, previous=between),
    )
    for view in views:
        # An earlier job of the same view leaves its rankings cached (read in part: the rest
        # is ranked when a later job reads on): they must not leak.
        list(rank_candidates(earlier, view, aliases=ALIASES)[:1])
        assert list(rank_candidates(spec, view.with_queued(sent), blocked, **options)) == expected
        assert list(rank_candidates(spec, view, blocked, **options)) == rank_candidates_by_scan(
            spec, nodes, blocked, **options
        )


def test_a_new_view_reuses_the_index_of_an_unchanged_inventory() -> None:
    first = node("pi1", {"m": True})
    busier = replace(first, queued=3, info=first.info.model_copy(update={"in_flight": 1}))
    old = NodeIndex([first])
    index = NodeIndex([busier], previous=old)
    assert index.entry("pi1") is old.entry("pi1")
    changed = node("pi1", {"m": True, "n": False})
    assert NodeIndex([changed], previous=old).entry("pi1") is not old.entry("pi1")
    (candidate,) = rank_candidates(job(model="m"), index)
    assert candidate.load == 4  # the new view's load, with the old view's inventory


def test_a_node_tagged_chat_serves_jobs_asking_for_that_tag() -> None:
    # "chat" is stripped from models' capabilities (every chat model has it), not from the
    # node's own tags: the index must keep it where the scan does.
    nodes = [node("pi1", {"m": True}, tags=frozenset({"chat"})), node("pi2", {"m": True})]
    spec = job(tags=frozenset({"chat"}))
    assert [c.node for c in rank_candidates(spec, NodeIndex(nodes))] == ["pi1"]
    assert list(rank_candidates(spec, NodeIndex(nodes))) == rank_candidates_by_scan(spec, nodes)
