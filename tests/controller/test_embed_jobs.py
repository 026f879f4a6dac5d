"""Embed jobs through the Python API (blocking and asyncio) and ``corral embed``, onto real
workers on a real Redis: vectors in order, unknown models refused, a cancel that stops the
backend's request, a node lost mid-job that hands it on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import JobCancelled, UnknownModel
from broker.schemas import ErrorEvent, StartedEvent
from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.cli import ExitCode
from controller.client import CorralClient
from controller.embedding import EmbedOutcome, make_embed_spec
from tests.controller.cli.test_models import corral, flat
from tests.support.servers import REPO_ROOT, WorkerProcess, running_workers, wait_until
from worker.backends.simulated import simulated_embedding

EMBEDDER = ["--simulate", "--sim-first-token-ms", "5", "--sim-models", "sim-small,sim-embed"]
SLOW = ["--simulate", "--sim-first-token-ms", "30000", "--sim-models", "sim-embed"]


@pytest.fixture(scope="module")
def workers(module_broker_url: str, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("quick", EMBEDDER),
        ("slow", SLOW),
        ("chatty", ["--simulate", "--sim-first-token-ms", "5"]),
    ) as started:
        with CorralClient(build_settings(broker_url=module_broker_url)) as client:
            wait_until(lambda: sum(n.up for n in client.nodes()) == 3, 20, "three nodes up")
        yield started


@pytest.fixture
def client(module_broker_url: str, workers: list[WorkerProcess]) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=module_broker_url)) as c:
        yield c


def test_the_blocking_client_embeds_a_batch_in_order(client: CorralClient) -> None:
    result = client.embed(["red", "green", "blue sky"], model="sim-embed", node="quick")
    assert result.status == "ok" and result.node == "quick" and result.model == "sim-embed"
    assert [list(v) for v in result.embeddings] == [
        simulated_embedding(t) for t in ("red", "green", "blue sky")
    ]
    assert result.usage.prompt_tokens == 4
    assert result.text == ""


def test_the_async_client_embeds_too(module_broker_url: str, workers: list[WorkerProcess]) -> None:
    async def scenario() -> list[list[float]]:
        async with AsyncCorralClient(build_settings(broker_url=module_broker_url)) as client:
            result = await client.embed(["one", "two"], model="sim-embed", node="quick")
            return [list(v) for v in result.embeddings]

    assert asyncio.run(scenario()) == [simulated_embedding("one"), simulated_embedding("two")]


def test_unknown_models_are_refused_before_anything_is_sent(client: CorralClient) -> None:
    with pytest.raises(UnknownModel, match="no-such-model"):
        client.embed(["x"], model="no-such-model")
    with pytest.raises(UnknownModel, match="not an embedding model"):
        client.embed(["x"], model="sim-small")


def test_a_cancel_stops_an_embed_job_on_its_node(client: CorralClient) -> None:
    spec = make_embed_spec(["take your time"], model="sim-embed", node="slow")
    run = client.submit(spec)
    events = run.events(60)
    outcome = EmbedOutcome(spec.job_id)
    started = next(events)
    assert isinstance(started, StartedEvent) and started.node == "slow"
    cancelled_at = time.monotonic()
    assert client.cancel(spec.job_id)
    rest = list(events)
    for event in rest:
        outcome.see(event)
    assert time.monotonic() - cancelled_at < 20  # the backend's 30 s wait did not run out
    assert isinstance(rest[-1], ErrorEvent) and rest[-1].code == "cancelled"
    with pytest.raises(JobCancelled):
        outcome.result()


def test_corral_embed_prints_json(module_broker_url: str, workers: list[WorkerProcess]) -> None:
    done = corral(module_broker_url, "embed", "--model", "sim-embed", "--node", "quick", "hi", "yo")
    assert done.returncode == ExitCode.OK, done.stderr
    printed = json.loads(done.stdout)
    assert printed["embeddings"] == [simulated_embedding("hi"), simulated_embedding("yo")]
    assert (printed["model"], printed["node"], printed["prompt_tokens"]) == (
        "sim-embed",
        "quick",
        2,
    )
    piped = subprocess.run(
        [sys.executable, "-m", "controller", "embed", "--model", "sim-embed", "-"],
        input="first line\n\nsecond line\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if k != "CORRAL_CONFIG"},
            "CORRAL_BROKER_URL": module_broker_url,
        },
        cwd=REPO_ROOT,
    )
    assert piped.returncode == ExitCode.OK, piped.stderr
    assert json.loads(piped.stdout)["embeddings"] == [
        simulated_embedding("first line"),
        simulated_embedding("second line"),
    ]
    missing = corral(module_broker_url, "embed", "--model", "nope", "hi")
    assert missing.returncode == ExitCode.NO_ROUTE
    assert "nope" in flat(missing.stderr)


def test_an_embed_job_whose_node_dies_moves_to_another(
    client: CorralClient, module_broker_url: str, module_log_dir: Path
) -> None:
    crash = [*EMBEDDER[:3], "--sim-models", "sim-embed", "--tags", "failover"]
    with running_workers(
        module_broker_url,
        module_log_dir,
        # Same model, loaded on both: the name breaks the tie, so a-crashy is tried first.
        ("a-crashy", [*crash, "--sim-crash-on", "BOOM"]),
        ("b-backup", crash),
    ):
        wait_until(
            lambda: {"a-crashy", "b-backup"} <= {n.name for n in client.nodes() if n.up},
            20,
            "both failover nodes up",
        )
        spec = make_embed_spec(
            ["BOOM goes the node"], model="sim-embed", tags=frozenset({"failover"})
        )
        events = list(client.stream(spec))
        started = [e.node for e in events if isinstance(e, StartedEvent)]
        assert started == ["a-crashy", "b-backup"]
        outcome = EmbedOutcome(spec.job_id)
        for event in events:
            outcome.see(event)
        result = outcome.result()
        assert result.node == "b-backup"
        assert [list(v) for v in result.embeddings] == [simulated_embedding("BOOM goes the node")]
