"""A 200-node simulated fleet (``corral sim``) against the real controller, router and Redis.

One ``python -m worker.sim`` process hosts the nodes; the controller side is the real client
(Python API) and the real CLI in their own processes' view of Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import names
from broker.schemas import DoneEvent, ReroutedEvent, StartedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from controller.router import NodeState
from tests.support.servers import REPO_ROOT, WorkerProcess, start_sim_fleet, wait_until
from worker.sim.profiles import NodeProfile, fleet_profiles

NODES = 200
MODELS_PER_NODE = 5
SEED = 3
HEARTBEAT_S = 0.5
# Each answer streams about 25 words 40 ms apart: a job lasts about a second, long enough to
# kill its node while it runs.
SIM_ARGS = [
    f"--nodes={NODES}",
    f"--models-per-node={MODELS_PER_NODE}",
    f"--seed={SEED}",
    "--slow=0",
    "--failing=0",
    "--first-token-ms=20",
    "--token-ms=40",
    "--loglevel=INFO",
]
PROFILES = {
    p.name: p
    for p in fleet_profiles(
        NODES, models_per_node=MODELS_PER_NODE, seed=SEED, slow_fraction=0, failing_fraction=0
    )
}


def holders(model: str) -> set[str]:
    return {name for name, p in PROFILES.items() if model in p.models}


def shared_models(minimum: int) -> list[str]:
    """Catalog models held by at least ``minimum`` nodes, most widely held last."""
    counts: dict[str, int] = {}
    for profile in PROFILES.values():
        for model in profile.models[1:]:
            counts[model] = counts.get(model, 0) + 1
    return sorted((m for m, c in counts.items() if c >= minimum), key=lambda m: (counts[m], m))


@pytest.fixture(scope="module")
def fleet(module_broker_url: str, module_log_dir: Path) -> Iterator[WorkerProcess]:
    process = start_sim_fleet(
        module_broker_url, *SIM_ARGS, heartbeat_s=HEARTBEAT_S, log_dir=module_log_dir
    )
    yield process
    # A clean stop: Celery's warm shutdown, then every node marked down (slow on a busy VM).
    assert process.stop(timeout_s=60) == 0, process.log()[-3000:]


@pytest.fixture(scope="module")
def client(module_broker_url: str, fleet: WorkerProcess) -> Iterator[CorralClient]:
    settings = build_settings(broker_url=module_broker_url, heartbeat_interval_s=HEARTBEAT_S)
    with CorralClient(settings) as corral:
        yield corral


def run_to_end(client: CorralClient, model: str, prompt: str) -> DoneEvent:
    run = client.submit(make_spec(prompt, model=model))
    events = list(run.events(timeout_s=30))
    assert isinstance(events[-1], DoneEvent), events[-1]
    return events[-1]


def test_every_node_of_the_fleet_is_up_with_its_own_models(client: CorralClient) -> None:
    nodes = client.nodes()
    assert len(nodes) == NODES
    assert all(n.up for n in nodes)
    for state in nodes:
        profile: NodeProfile = PROFILES[state.name]
        assert state.info.model_names() == set(profile.models)
        assert state.info.tags == profile.tags
        assert state.info.capacity == profile.capacity
    assert len({n.info.instance for n in nodes}) == NODES  # one identity per node


def test_jobs_naming_a_model_run_on_a_node_that_holds_it(client: CorralClient) -> None:
    models = shared_models(minimum=1)[::7][:12]
    results: dict[str, DoneEvent] = {}

    def one(model: str) -> None:
        results[model] = run_to_end(client, model, f"which node has {model}?")

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == sorted(models)
    for model, done in results.items():
        assert done.result.status == "ok"
        assert done.result.model == model
        assert done.result.node in holders(model), (model, done.result.node)


def test_corral_ask_routes_into_the_fleet(module_broker_url: str, fleet: WorkerProcess) -> None:
    model = shared_models(minimum=1)[0]  # the least held: few nodes can serve it
    env = {**os.environ, "CORRAL_BROKER_URL": module_broker_url}
    env.pop("CORRAL_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "controller", "ask", "--json", "--model", model, "hello"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (final,) = [e for e in events if e.get("type") == "done"]
    assert final["result"]["node"] in holders(model)


def test_jobs_of_killed_nodes_move_to_other_holders(
    client: CorralClient, module_broker_url: str
) -> None:
    control = redis.Redis.from_url(module_broker_url)
    killed: list[str] = []
    for model in shared_models(minimum=4)[-3:]:
        spec = make_spec(f"kill the node serving {model}", model=model, retry_partial=True)
        run = client.submit(spec)
        served_by: list[str] = []
        moved: list[ReroutedEvent] = []
        final = None
        for event in run.events(timeout_s=30):
            if isinstance(event, StartedEvent):
                served_by.append(event.node)
                if len(served_by) == 1:
                    control.publish(names.SIM_CONTROL_CHANNEL, json.dumps({"kill": [event.node]}))
                    killed.append(event.node)
            elif isinstance(event, ReroutedEvent):
                moved.append(event)
            elif isinstance(event, DoneEvent):
                final = event
        assert final is not None and final.result.status == "ok"
        assert moved and moved[0].from_node == served_by[0]
        assert final.result.node != served_by[0]
        assert final.result.node in holders(model)
    # The dead stay dead: the cluster shows them down and no new job goes to them.
    wait_until(
        lambda: {n.name for n in client.nodes() if not n.up} >= set(killed), 10, "nodes down"
    )
    for model in shared_models(minimum=4)[-3:]:
        assert run_to_end(client, model, "after the kills").result.node not in killed


def test_corral_sim_without_a_broker_says_so_without_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_CONFIG"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            "sim",
            "--nodes=3",
            "--broker=redis://:hunter2@127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert "corral sim: cannot reach Redis at redis://***@127.0.0.1:1/0" in done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_a_model_warmed_on_a_node_shows_loaded_in_the_next_view(client: CorralClient) -> None:
    # The inventory changed (a loaded flag): its digest changes, the whole NodeInfo is stored
    # again, and the controller re-reads that node while it keeps every other one.
    name, profile = next(
        (n, p) for n, p in sorted(PROFILES.items()) if n not in {s.name for s in down(client)}
    )
    model = profile.models[1]
    before = {s.name: s for s in client.nodes()}
    assert not _loaded(before[name], model)
    events = list(client.model_op(name, "warm", model).events(timeout_s=30))
    assert isinstance(events[-1], DoneEvent), events[-1]
    after = {s.name: s for s in client.nodes()}
    assert _loaded(after[name], model)
    others = [n for n in after if n != name and after[n].up]
    # Nodes whose inventory did not change keep the very model lists parsed before.
    assert all(
        after[n].info.backends[0].models is before[n].info.backends[0].models for n in others
    )


def down(client: CorralClient) -> list[NodeState]:
    return [s for s in client.nodes() if not s.up]


def _loaded(state: NodeState, model: str) -> bool:
    return any(m.loaded for b in state.info.backends for m in b.models if m.name == model)
