"""The router and context windows: a job goes only where its estimated tokens fit."""

from __future__ import annotations

import time

import pytest

from broker.errors import PromptTooLong
from broker.schemas import (
    BackendInfo,
    ChatMessage,
    GenerationOptions,
    JobSpec,
    ModelInfo,
    NodeInfo,
)
from controller.router import (
    NodeState,
    candidates_for,
    estimated_tokens,
    rank_candidates,
    rank_candidates_by_scan,
)


def node(
    name: str, models: dict[str, int | None], loaded: frozenset[str] = frozenset()
) -> NodeState:
    backend = BackendInfo(
        name="b",
        kind="ollama",
        healthy=True,
        capacity=2,
        models=tuple(
            ModelInfo(name=m, context_length=ctx, loaded=m in loaded) for m, ctx in models.items()
        ),
    )
    info = NodeInfo(
        name=name,
        version="0",
        backends=(backend,),
        in_flight=0,
        capacity=2,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=time.time(),
    )
    return NodeState(info=info, up=True)


def job(chars: int, *, model: str | None = None, max_tokens: int | None = None) -> JobSpec:
    return JobSpec(
        job_id="job-0001",
        messages=(ChatMessage(role="user", content="x" * chars),),
        model=model,
        options=GenerationOptions(max_tokens=max_tokens),
        created_at=0,
    )


def test_tokens_are_estimated_as_characters_over_four_plus_the_answer() -> None:
    assert estimated_tokens(job(40_000)) == 10_000
    assert estimated_tokens(job(40_000, max_tokens=500)) == 10_500


def test_a_long_prompt_skips_the_models_it_does_not_fit() -> None:
    nodes = [
        node("pi2", {"llama3.2:3b": 8192}),
        node("gpu", {"qwen2.5:7b": 32768}),
    ]
    picked = candidates_for(job(4 * 20_000), nodes)
    assert [(c.node, c.model) for c in picked] == [("gpu", "qwen2.5:7b")]


def test_the_answers_max_tokens_count_too() -> None:
    nodes = [node("pi2", {"small": 8192}), node("gpu", {"big": 32768})]
    assert {c.node for c in candidates_for(job(4 * 6000), nodes)} == {"gpu", "pi2"}
    assert [c.node for c in candidates_for(job(4 * 6000, max_tokens=4000), nodes)] == ["gpu"]


def test_a_model_of_unknown_context_is_not_refused() -> None:
    nodes = [node("pi2", {"mystery": None})]
    assert [c.model for c in candidates_for(job(4 * 500_000), nodes)] == ["mystery"]


def test_a_short_prompt_goes_anywhere() -> None:
    nodes = [node("pi2", {"tiny": 2048})]
    assert candidates_for(job(100), nodes)


def test_nothing_fits_names_the_prompt_the_model_and_its_context() -> None:
    nodes = [node("pi2", {"llama3.2:3b": 131_072})]
    with pytest.raises(PromptTooLong) as caught:
        candidates_for(job(4 * 180_000), nodes)
    assert str(caught.value) == "prompt ~180k tokens exceeds llama3.2:3b's 131k context on pi2"


def test_with_several_candidates_the_error_names_the_largest() -> None:
    nodes = [node("pi1", {"a": 8192}), node("gpu", {"b": 32768}), node("pi2", {"c": 4096})]
    with pytest.raises(PromptTooLong, match=r"exceeds b's 33k context on gpu \(the largest of 3"):
        candidates_for(job(4 * 40_000, max_tokens=100), nodes)
    with pytest.raises(PromptTooLong, match=r"prompt ~40k tokens \+ 100 max tokens"):
        candidates_for(job(4 * 40_000, max_tokens=100), nodes)


def test_a_pinned_model_that_is_too_small_is_refused_not_swapped() -> None:
    nodes = [node("pi2", {"small": 8192}), node("gpu", {"big": 131_072})]
    with pytest.raises(PromptTooLong, match=r"small's 8\.2k context on pi2"):
        candidates_for(job(4 * 20_000, model="small"), nodes)


def test_any_model_means_any_model_that_fits_on_the_backend() -> None:
    nodes = [node("pi", {"small": 8192, "big": 131_072}, loaded=frozenset({"small"}))]
    assert [c.model for c in candidates_for(job(100), nodes)] == ["small"]  # loaded, fits
    (picked,) = candidates_for(job(4 * 20_000), nodes)
    assert (picked.model, picked.model_loaded) == ("big", False)


def test_any_model_names_the_largest_of_the_backends_models_when_none_fits() -> None:
    nodes = [node("pi", {"small": 8192, "big": 32768}, loaded=frozenset({"small"}))]
    with pytest.raises(PromptTooLong, match=r"exceeds big's 33k context on pi$"):
        candidates_for(job(4 * 40_000), nodes)


def test_the_index_and_the_scan_agree_on_context() -> None:
    nodes = [node(f"n{i}", {f"m{i}": 4096 * (i + 1)}) for i in range(6)]
    nodes.append(node("two", {"small": 8192, "big": 65536}, loaded=frozenset({"small"})))
    for chars in (4 * 1000, 4 * 9000, 4 * 17_000, 4 * 30_000):
        spec = job(chars)
        assert list(rank_candidates(spec, nodes)) == rank_candidates_by_scan(spec, nodes)
