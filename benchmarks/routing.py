"""One routing decision on the pure router, at 10, 100 and 1,000 nodes of 100 models each.

Synthetic fleets, no Redis: every node holds 100 models drawn from a catalog of 1,000 (so a model
is on about a tenth of the nodes), one in ten loaded, and two tags of twenty. Measured per
fleet size, for a job naming a model and a job naming tags, through the index the cluster view
keeps (``NodeIndex``, built once per view); each view is a new cluster read where a quarter of
the nodes have a new load. A decision is what a job does: rank, and take the best candidate
(the router's answer makes candidates as they are read).

- first in view: the first decision of a view for a query an earlier view asked too (wall and
  the thread's CPU time: a shared machine's scheduler shows in the first, not the second);
- inventory changed: the first decision after the best node loaded and unloaded a model;
- first ask: the first decision for a query no earlier view asked (its holders grouped);
- all made: a first decision in view that makes every candidate (``list``), as a caller
  printing the whole ranking would;
- repeat: again in the same view (the query's ranking is kept for the view's life,
  ``route_cache_s``); scan: the old scan of every model of every node.

And the time to build the index. A last row names a model every node holds: the candidates
themselves are then the fleet. After building a fleet of 100 nodes or more it does what the
cluster reader does after such a read, ``settle_parsed_inventories`` (``--no-settle``: not).

    python -m benchmarks.routing [--quick] [--no-settle]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from broker.schemas import BackendInfo, ChatMessage, JobSpec, ModelInfo, NodeInfo
from controller.cluster import FREEZE_AFTER_PARSING, settle_parsed_inventories
from controller.node_index import NodeIndex
from controller.router import Candidate, NodeState, rank_candidates, rank_candidates_by_scan

CATALOG = [f"model{i:04d}:7b" for i in range(1000)]
EVERYWHERE = "common:8b"
TAGS = [f"tag{i:02d}" for i in range(20)]
MODELS_PER_NODE = 100


def synthetic_fleet(nodes: int, seed: int = 7) -> list[NodeState]:
    rng = random.Random(seed)
    fleet = []
    for n in range(nodes):
        names = [EVERYWHERE, *rng.sample(CATALOG, MODELS_PER_NODE - 1)]
        backend = BackendInfo(
            name="ollama",
            kind="ollama",
            healthy=True,
            capacity=4,
            in_flight=rng.randint(0, 2),
            latency_ms=rng.uniform(20, 400),
            models=tuple(ModelInfo(name=m, loaded=rng.random() < 0.1) for m in names),
        )
        info = NodeInfo(
            name=f"node{n:04d}",
            version="bench",
            tags=frozenset(rng.sample(TAGS, 2)),
            backends=(backend,),
            in_flight=backend.in_flight,
            capacity=4,
            heartbeat_interval_s=2,
            started_at=0,
            sent_at=0,
        )
        fleet.append(NodeState(info=info, up=rng.random() > 0.02, queued=rng.randint(0, 2)))
    return fleet


def next_read(fleet: list[NodeState], rng: random.Random) -> list[NodeState]:
    return [
        replace(state, queued=(state.queued + 1) % 3) if rng.random() < 0.25 else state
        for state in fleet
    ]


def swap_loaded(fleet: list[NodeState], name: str) -> None:
    """Node ``name`` of ``fleet`` loads its first unloaded model and unloads a loaded one
    (a new inventory, as after an Ollama swap)."""
    at = next(i for i, s in enumerate(fleet) if s.name == name)
    state = fleet[at]
    backend = state.info.backends[0]
    models = list(backend.models)
    loaded = [i for i, m in enumerate(models) if m.loaded]
    idle = next(i for i, m in enumerate(models) if not m.loaded)
    models[idle] = models[idle].model_copy(update={"loaded": True})
    if loaded:
        models[loaded[0]] = models[loaded[0]].model_copy(update={"loaded": False})
    backend = backend.model_copy(update={"models": tuple(models)})
    info = state.info.model_copy(update={"backends": (backend,)})
    fleet[at] = replace(state, info=info)


def job(model: str | None = None, tags: frozenset[str] = frozenset()) -> JobSpec:
    return JobSpec(
        job_id="bench-job-0001",
        messages=(ChatMessage(role="user", content="hi"),),
        model=model,
        tags=tags,
        created_at=0,
    )


def decide(spec: JobSpec, view: NodeIndex) -> Candidate | None:
    """A routing decision as a job makes it: rank, and take the best candidate (a failover
    takes the next; the clients stop at the first whose breaker lets it through)."""
    return next(iter(rank_candidates(spec, view)), None)


def time_us(call: Callable[[], object], runs: int, cpu: list[float] | None = None) -> list[float]:
    """Wall-clock µs per call; with ``cpu``, this thread's CPU µs per call are added to it
    (on a shared machine the wall clock also counts the time the scheduler gave away)."""
    samples = []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.thread_time()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
        if cpu is not None:
            cpu.append((time.thread_time() - started_cpu) * 1e6)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs (well under a minute)")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="leave the fleet in the garbage collector's generations (as before gc.freeze)",
    )
    args = parser.parse_args()
    runs, scan_runs = (300, 20) if args.quick else (3000, 100)
    table = Table(title="one routing decision (µs); index build (ms)")
    for column in (
        "nodes",
        "job",
        "candidates",
        "first in view p50",
        "first p99",
        "first CPU p50",
        "first CPU p99",
        "inventory changed CPU p50",
        "inventory changed CPU p99",
        "first ask CPU p50",
        "first ask CPU p99",
        "all made p50",
        "all made p99",
        "repeat p50",
        "repeat p99",
        "scan p50",
        "scan p99",
    ):
        table.add_column(column, justify="right")
    builds = Table(title="index build per cluster view (ms)")
    for column in ("nodes", "from scratch", "no inventory changed", "10 inventories changed"):
        builds.add_column(column, justify="right")
    rng = random.Random(1)
    worst: dict[str, float] = {}
    for size in (10, 100, 1000):
        fleet = synthetic_fleet(size)
        other = synthetic_fleet(size, seed=8)
        index = NodeIndex(fleet)
        scratch = time_us(lambda fleet=fleet: NodeIndex(fleet), 3)
        same = time_us(lambda fleet=fleet, index=index: NodeIndex(fleet, previous=index), 5)
        ten_changed = [*other[:10], *fleet[10:]]
        changed = time_us(
            lambda nodes=ten_changed, index=index: NodeIndex(nodes, previous=index), 5
        )
        builds.add_row(
            str(size),
            *(f"{statistics.median(t) / 1000:.1f}" for t in (scratch, same, changed)),
        )
        if not args.no_settle and size >= FREEZE_AFTER_PARSING:
            # What the cluster reader does after a read that parsed this many inventories.
            settle_parsed_inventories()
        jobs = {
            "model": lambda: job(model=rng.choice(CATALOG)),
            "tags": lambda: job(tags=frozenset(rng.sample(TAGS, 1))),
            "model on every node": lambda: job(model=EVERYWHERE),
        }
        for label, make in jobs.items():
            specs = [make() for _ in range(runs)]
            first: list[float] = []
            first_cpu: list[float] = []
            changed_cpu: list[float] = []
            first_ask_cpu: list[float] = []
            first_all: list[float] = []
            repeat: list[float] = []
            asked: set[tuple[str | None, frozenset[str]]] = set()
            view = index
            for spec in specs:
                # Each step is a new cluster read: a quarter of the nodes have a new load (at
                # 2 s heartbeats and 0.5 s reads), the rest are the very same objects.
                view = NodeIndex(next_read(fleet, rng), previous=view)
                ask = time_us(lambda spec=spec, view=view: decide(spec, view), 1, [])
                if (spec.model, spec.tags) not in asked:
                    first_ask_cpu += ask  # no earlier view asked it
                    asked.add((spec.model, spec.tags))
                # The usual first decision of a view: an earlier view asked the same query.
                view = NodeIndex(next_read(fleet, rng), previous=view)
                first += time_us(lambda spec=spec, view=view: decide(spec, view), 1, first_cpu)
                repeat += time_us(lambda spec=spec, view=view: decide(spec, view), 1)
                # A node that can serve the job loads or unloads a model (an inventory
                # change, kept by later reads).
                best = decide(spec, view)
                if best is not None:
                    swap_loaded(fleet, best.node)
                view = NodeIndex(next_read(fleet, rng), previous=view)
                time_us(lambda spec=spec, view=view: decide(spec, view), 1, changed_cpu)
                # Another read, where the same job is ranked whole (every candidate made).
                view = NodeIndex(next_read(fleet, rng), previous=view)
                first_all += time_us(
                    lambda spec=spec, view=view: list(rank_candidates(spec, view)), 1
                )
            scan_it = iter(specs)
            scanned = time_us(
                lambda it=scan_it, fleet=fleet: rank_candidates_by_scan(next(it), fleet), scan_runs
            )
            count = statistics.mean(len(rank_candidates(s, index)) for s in specs[:50])
            if size == 1000 and label != "model on every node":
                worst[f"{label} first"] = percentile(first, 99)
                worst[f"{label} first, CPU time"] = percentile(first_cpu, 99)
                worst[f"{label} after an inventory change, CPU time"] = percentile(changed_cpu, 99)
                worst[f"{label} repeat"] = percentile(repeat, 99)
            table.add_row(
                str(size),
                label,
                f"{count:.0f}",
                *(
                    f"{percentile(values, q):.0f}"
                    for values in (
                        first,
                        first_cpu,
                        changed_cpu,
                        first_ask_cpu,
                        first_all,
                        repeat,
                        scanned,
                    )
                    for q in (50, 99)
                ),
            )
    console = Console()
    console.print(table)
    console.print(builds)
    for what, p99 in worst.items():
        verdict = "meets" if p99 < 100 else "misses"
        console.print(f"1,000 nodes, {what}: p99 {p99:.0f} µs ({verdict} the 100 µs target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
