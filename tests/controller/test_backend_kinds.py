"""A heartbeat naming a backend kind this controller does not know still routes (real Redis).

A worker newer than the controller may front a kind added since (an agent CLI, a new
provider). Routing needs a backend's name and models, never its transport, so the node must
stay in the cluster view and keep serving the models of its other backends, and of that one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from broker import names
from broker.schemas import BACKEND_KINDS, ChatMessage, JobSpec
from controller.cluster import read_cluster
from controller.router import candidates_for


@pytest.fixture
def conn(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


def heartbeat(name: str, backends: list[dict[str, object]]) -> str:
    return json.dumps(
        {
            "v": 2,
            "name": name,
            "version": "9.9",
            "backends": backends,
            "in_flight": 0,
            "capacity": 2,
            "heartbeat_interval_s": 2,
            "started_at": time.time(),
            "sent_at": time.time(),
        }
    )


def backend(name: str, kind: str, model: str) -> dict[str, object]:
    return {
        "name": name,
        "kind": kind,
        "healthy": True,
        "capacity": 1,
        "models": [{"name": model, "loaded": True}],
    }


def job(model: str) -> JobSpec:
    return JobSpec(
        job_id="job-kinds-1",
        messages=(ChatMessage(role="user", content="hi"),),
        model=model,
        created_at=time.time(),
    )


def test_a_node_with_an_unknown_backend_kind_still_routes(conn: redis.Redis) -> None:
    assert "bedrock-agent" not in BACKEND_KINDS
    beat = heartbeat(
        "future",
        [
            backend("agent", "bedrock-agent", "agent-model"),
            backend("ollama", "ollama", "llama3.2:1b"),
        ],
    )
    conn.hset(names.NODES_HASH, "future", beat)
    conn.set(names.node_alive_key("future"), "instance-1", px=10_000)

    nodes = read_cluster(conn).nodes
    assert [n.name for n in nodes] == ["future"]
    assert [b.kind for b in nodes[0].info.backends] == ["bedrock-agent", "ollama"]

    chosen = candidates_for(job("llama3.2:1b"), nodes)[0]
    assert (chosen.node, chosen.backend) == ("future", "ollama")
    chosen = candidates_for(job("agent-model"), nodes)[0]
    assert (chosen.node, chosen.backend) == ("future", "agent")
