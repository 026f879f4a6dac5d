"""The tier walk, as a pure function: model by model of the priority list, each model's routes
local first, then subscription CLIs, then metered APIs; and the reason the answer gives."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.errors import UnknownModel
from broker.schemas import BackendInfo, ChatMessage, JobSpec, ModelInfo, NodeInfo
from broker.settings import CorralSettings
from broker.tiers import tier_of_kind
from controller.router import (
    NodeState,
    candidates_for,
    rank_candidates,
    rank_candidates_by_scan,
    routing_aliases,
)
from controller.tiers import explain_choice

PRIORITY = ("qwen", "sonnet", "gpt")


def node(
    name: str,
    kind: str,
    models: tuple[str, ...],
    *,
    up: bool = True,
    capacity: int = 2,
    in_flight: int = 0,
    healthy: bool = True,
) -> NodeState:
    backend = BackendInfo(
        name=kind,
        kind=kind,
        healthy=healthy,
        error=None if healthy else "command 'claude' is not installed",
        capacity=capacity,
        in_flight=in_flight,
        models=tuple(ModelInfo(name=m, loaded=True) for m in models),
    )
    info = NodeInfo(
        name=name,
        version="0",
        backends=(backend,),
        in_flight=in_flight,
        capacity=capacity,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=time.time(),
    )
    return NodeState(info=info, up=up)


def job(model: str | None = None) -> JobSpec:
    return JobSpec(
        job_id="job-tiers-1",
        messages=(ChatMessage(role="user", content="hi"),),
        model=model,
        created_at=0,
    )


ALIASES = routing_aliases({}, PRIORITY)

# qwen runs on a Pi; sonnet on a laptop's Claude subscription and on Anthropic's API (two
# workers holding keys); gpt on OpenAI's API only.
FLEET = [
    node("pi", "ollama", ("qwen",)),
    node("laptop", "cli", ("sonnet",)),
    node("cloud1", "anthropic", ("sonnet",), capacity=8),
    node("cloud2", "anthropic", ("sonnet",), capacity=4),
    node("cloud3", "openai-cloud", ("gpt",)),
]


def order(nodes: list[NodeState], blocked: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    ranked = rank_candidates(job(), nodes, blocked, aliases=ALIASES)
    assert list(ranked) == rank_candidates_by_scan(job(), nodes, blocked, aliases=ALIASES)
    return [(c.node, c.tier) for c in ranked]


def test_kinds_fall_into_tiers() -> None:
    assert [tier_of_kind(k) for k in ("ollama", "openai", "simulated")] == ["local"] * 3
    assert tier_of_kind("cli") == "subscription"
    assert {tier_of_kind(k) for k in ("anthropic", "google", "mistral", "deepseek")} == {"metered"}


def test_a_job_naming_no_model_walks_each_model_cheapest_tier_first() -> None:
    assert order(FLEET) == [
        ("pi", "local"),
        ("laptop", "subscription"),
        ("cloud1", "metered"),  # most spare capacity first within a tier
        ("cloud2", "metered"),
        ("cloud3", "metered"),
    ]


def test_auto_is_the_priority_list_by_name() -> None:
    ranked = rank_candidates(job("auto"), FLEET, aliases=ALIASES)
    assert [c.node for c in ranked] == ["pi", "laptop", "cloud1", "cloud2", "cloud3"]


def test_a_cheaper_tier_comes_first_even_with_less_spare_capacity() -> None:
    fleet = [node("laptop", "cli", ("sonnet",), capacity=1), FLEET[2]]
    ranked = rank_candidates(job("sonnet"), fleet, aliases=ALIASES)
    assert [(c.node, c.tier) for c in ranked] == [
        ("laptop", "subscription"),
        ("cloud1", "metered"),
    ]


def test_down_nodes_and_open_breakers_are_skipped_in_the_walk() -> None:
    fleet = [node("pi", "ollama", ("qwen",), up=False), *FLEET[1:]]
    assert order(fleet, frozenset({"laptop/cli", "cloud1"}))[:2] == [
        ("cloud2", "metered"),
        ("cloud3", "metered"),
    ]


def test_the_next_model_only_when_every_route_of_this_one_is_out() -> None:
    blocked = frozenset({"pi/ollama", "laptop/cli", "cloud1/anthropic", "cloud2/anthropic"})
    assert order(FLEET, blocked) == [("cloud3", "metered")]


def test_an_empty_walk_names_the_priority_list() -> None:
    with pytest.raises(UnknownModel, match="priority list"):
        candidates_for(job(), [node("x", "ollama", ("other",))], aliases=ALIASES)


def test_without_a_priority_list_a_job_naming_no_model_takes_any_model_local_first() -> None:
    ranked = rank_candidates(job(), FLEET, aliases={})
    assert ranked[0].tier == "local"
    assert [c.tier for c in ranked] == sorted(
        (c.tier for c in ranked), key=["local", "subscription", "metered"].index
    )


def test_the_priority_list_is_read_from_corral_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "corral.yaml"
    config.write_text("priority: [qwen, sonnet, gpt]\naliases:\n  coder: [qwen]\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    settings = CorralSettings()
    assert settings.priority == PRIORITY
    assert routing_aliases(settings.aliases, settings.priority) == {
        "coder": ("qwen",),
        "auto": PRIORITY,
    }


def test_the_reason_names_the_cheaper_routes_skipped_and_why() -> None:
    fleet = [node("pi", "ollama", ("qwen",), up=False), *FLEET[1:]]
    blocked = frozenset({"laptop/cli"})
    chosen = candidates_for(job(), fleet, blocked, aliases=ALIASES)[0]
    reason = explain_choice(job(), chosen, fleet, blocked, aliases=ALIASES)
    assert reason == (
        "sonnet on metered cloud1/anthropic; skipped qwen local: pi down; "
        "sonnet subscription: laptop/cli breaker open (failing or rate limited)"
    )


def test_the_reason_for_the_first_choice_says_so() -> None:
    chosen = candidates_for(job(), FLEET, aliases=ALIASES)[0]
    reason = explain_choice(job(), chosen, FLEET, (), aliases=ALIASES)
    assert reason == "qwen on local pi/ollama: the first choice's cheapest tier"


def test_the_reason_tells_an_unhealthy_cli_and_a_route_that_failed_this_job() -> None:
    fleet = [
        node("pi", "ollama", ("qwen",)),
        node("laptop", "cli", ("qwen",), healthy=False),
        node("cloud1", "anthropic", ("qwen",)),
    ]
    never = frozenset({"pi/ollama"})
    chosen = candidates_for(job(), fleet, never, aliases=ALIASES)[0]
    reason = explain_choice(job(), chosen, fleet, (), aliases=ALIASES, failed=never)
    assert reason == (
        "qwen on metered cloud1/anthropic; skipped qwen local: pi/ollama failed this job; "
        "qwen subscription: laptop/cli unhealthy (command 'claude' is not installed)"
    )
