"""Embed jobs on the router: only to embedding models, batched as sent, never to chat."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.errors import ConfigError, NoNodeAvailable, UnknownModel
from broker.schemas import JobAssignment, JobSpec
from controller.embedding import make_embed_spec
from controller.limits import prompt_bytes
from controller.node_index import NodeIndex
from controller.router import NodeState, candidates_for, rank_candidates
from tests.controller.test_router import job, node

EMBED = frozenset({"embed"})
CHAT = frozenset({"chat"})


def cluster() -> list[NodeState]:
    return [
        node(
            "gpu1",
            {"llama3.1:8b": True, "nomic-embed-text:latest": False},
            capabilities={"llama3.1:8b": CHAT, "nomic-embed-text:latest": EMBED},
        ),
        node("pi1", {"llama3.1:8b": True}, capabilities={"llama3.1:8b": CHAT}),
        node(
            "nuc",
            {"nomic-embed-text:latest": True, "bge-m3:latest": True},
            capabilities={"nomic-embed-text:latest": EMBED, "bge-m3:latest": EMBED},
        ),
    ]


def test_an_embed_job_goes_only_to_nodes_with_that_embedding_model() -> None:
    spec = make_embed_spec(["a", "b", "c"], model="nomic-embed-text")
    for nodes in (cluster(), NodeIndex(cluster())):
        ranked = rank_candidates(spec, nodes)
        assert [(c.node, c.model) for c in ranked] == [
            ("nuc", "nomic-embed-text:latest"),  # loaded there: no swap
            ("gpu1", "nomic-embed-text:latest"),
        ]


def test_an_embed_job_without_a_model_takes_any_embedding_model_never_a_chat_one() -> None:
    ranked = rank_candidates(make_embed_spec(["a"]), cluster())
    assert {c.node for c in ranked} == {"gpu1", "nuc"}
    assert all(c.model in ("nomic-embed-text:latest", "bge-m3:latest") for c in ranked)


def test_a_chat_job_never_goes_to_an_embedding_model() -> None:
    for nodes in (cluster(), NodeIndex(cluster())):
        assert {c.node for c in rank_candidates(job(), nodes)} == {"gpu1", "pi1"}
        with pytest.raises(UnknownModel, match="is an embedding model: it cannot chat"):
            candidates_for(job(model="nomic-embed-text"), nodes)


def test_unknown_or_chat_only_models_are_unknown_embedding_models() -> None:
    with pytest.raises(UnknownModel, match="no-such-model"):
        candidates_for(make_embed_spec(["a"], model="no-such-model"), cluster())
    with pytest.raises(UnknownModel, match=r"not an embedding model.*bge-m3:latest"):
        candidates_for(make_embed_spec(["a"], model="llama3.1:8b"), cluster())
    chat_only = [node("pi1", {"llama3.1:8b": True}, capabilities={"llama3.1:8b": CHAT})]
    with pytest.raises(NoNodeAvailable, match="no up node has an embedding model"):
        candidates_for(make_embed_spec(["a"]), chat_only)


def test_a_node_that_does_not_say_what_its_models_do_gets_no_embed_job() -> None:
    silent = [node("old", {"mystery:latest": True})]  # no capabilities: assumed chat
    assert not rank_candidates(make_embed_spec(["a"]), silent)
    assert [c.node for c in rank_candidates(job(), silent)] == ["old"]


def test_embed_specs_carry_inputs_not_messages() -> None:
    spec = make_embed_spec(["one", "two"], model="m")
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec and again.kind == "embed" and again.inputs == ("one", "two")
    assert prompt_bytes(spec) == len("onetwo")
    assignment = JobAssignment(spec=spec, node="nuc", backend="ollama", model="m")
    assert "kind=embed" in assignment.argsrepr() and "one" not in assignment.argsrepr()
    fields = spec.model_dump(mode="json")
    with pytest.raises(ValidationError, match="at least one input"):
        JobSpec.model_validate({**fields, "inputs": []})
    with pytest.raises(ValidationError, match="not messages"):
        JobSpec.model_validate({**fields, "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValidationError, match="no session"):
        JobSpec.model_validate({**fields, "session": "s1"})
    chat = job().model_dump(mode="json")
    with pytest.raises(ValidationError, match="not inputs"):
        JobSpec.model_validate({**chat, "inputs": ["x"]})
    with pytest.raises(ValidationError, match="at least one message"):
        JobSpec.model_validate({**chat, "messages": []})
    with pytest.raises(ConfigError, match="at least one input"):
        make_embed_spec([])
    with pytest.raises(ConfigError, match="a list of texts"):
        make_embed_spec("one string")
