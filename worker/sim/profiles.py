"""Who is who in a simulated fleet: each node's models, tags, capacity and pace, from a seed.

The same seed gives the same fleet, so a test or a benchmark can say which nodes hold a model,
which are slow and which fail, and a run can be repeated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GB = 1_000_000_000

TAG_POOL = ("gpu", "cpu", "pi", "code", "big-memory", "lab", "office", "edge")


@dataclass(frozen=True, slots=True)
class NodeProfile:
    name: str
    tags: frozenset[str]
    models: tuple[str, ...]
    """The first one starts loaded."""
    capacity: int
    first_token_s: float
    token_s: float
    memory_bytes: int
    slow: bool = False
    failing: bool = False
    """Every chat on it fails as an unreachable backend would (the job moves on)."""


def catalog(models_per_node: int) -> list[str]:
    """The fleet's model names: five times a node's count, so a model is on about a fifth of
    the nodes."""
    return [f"sim{i:03d}:7b" for i in range(max(models_per_node * 5, 1))]


def fleet_profiles(
    nodes: int,
    *,
    models_per_node: int = 20,
    seed: int = 0,
    prefix: str = "sim",
    first_token_s: float = 0.02,
    token_s: float = 0.005,
    slow_fraction: float = 0.1,
    failing_fraction: float = 0.0,
) -> list[NodeProfile]:
    """``nodes`` profiles named ``<prefix>000``..., drawn from ``seed``.

    Every node holds ``sim-small`` (so a job naming no model runs anywhere) and
    ``models_per_node - 1`` models of the catalog. A slow node takes ten times the first-token
    time; a failing node's backend refuses every chat.
    """
    rng = random.Random(seed)  # noqa: S311 - a repeatable fleet, not a secret
    names = catalog(models_per_node)
    width = max(3, len(str(nodes - 1)))
    profiles = []
    for i in range(nodes):
        slow = rng.random() < slow_fraction
        failing = rng.random() < failing_fraction
        models = ("sim-small", *rng.sample(names, min(len(names), max(models_per_node - 1, 0))))
        profiles.append(
            NodeProfile(
                name=f"{prefix}{i:0{width}d}",
                tags=frozenset(rng.sample(TAG_POOL, 2)),
                models=models,
                capacity=rng.choice((1, 2, 2, 4)),
                first_token_s=first_token_s * (10 if slow else rng.uniform(0.8, 1.5)),
                token_s=token_s,
                memory_bytes=rng.choice((8, 16, 32, 64)) * GB,
                slow=slow,
                failing=failing,
            )
        )
    return profiles
