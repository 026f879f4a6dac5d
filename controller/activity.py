"""What the cluster is doing, as numbers: tokens per second, jobs done and failed, totals.

Each backend's heartbeat carries counters that only go up while its worker runs
(``broker.schemas.JobCounters``). A rate is the difference of two heartbeats' counters over
the difference of their send times, both from the worker's own clock, so a controller's
clock or how often it reads does not skew it. No terminal I/O here: ``corral top`` renders
what ``ActivityTracker.update`` returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from broker.schemas import JobCounters
from controller.router import NodeState

__all__ = [
    "ActivityTracker",
    "BackendActivity",
    "NodeActivity",
    "Reading",
    "Totals",
    "rate_between",
    "totals_of",
]

RATE_WINDOW_S = 10.0
"""A rate spans the heartbeats of about this many seconds: steadier than one beat's."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One backend's counters at one heartbeat."""

    instance: str
    sent_at: float
    counters: JobCounters


def rate_between(older: Reading, newer: Reading) -> float | None:
    """Tokens per second from ``older`` to ``newer``; None when they cannot be compared: the
    same beat twice, or a restarted worker (its counters began again at zero)."""
    elapsed = newer.sent_at - older.sent_at
    tokens = newer.counters.tokens_out - older.counters.tokens_out
    if older.instance != newer.instance or elapsed <= 0 or tokens < 0:
        return None
    return tokens / elapsed


@dataclass(frozen=True, slots=True)
class BackendActivity:
    name: str
    kind: str
    healthy: bool
    in_flight: int
    capacity: int
    latency_ms: float | None
    tokens_per_s: float | None
    """None until two heartbeats of this worker have been read (or the node is down)."""
    jobs_done: int
    jobs_failed: int
    """Since the worker started, like ``jobs_done``."""
    quota_left: float | None = None
    """A cloud backend's share of its provider's quota left (``BackendInfo.quota_left``)."""


@dataclass(frozen=True, slots=True)
class NodeActivity:
    name: str
    up: bool
    queued: int
    in_flight: int
    capacity: int
    sent_at: float
    backends: tuple[BackendActivity, ...]
    cloud_providers: frozenset[str] = frozenset()
    """The providers whose routes this ``--cloud`` worker serves."""

    @property
    def tokens_per_s(self) -> float | None:
        rates = [b.tokens_per_s for b in self.backends if b.tokens_per_s is not None]
        return sum(rates) if rates else None

    @property
    def jobs_done(self) -> int:
        return sum(b.jobs_done for b in self.backends)

    @property
    def jobs_failed(self) -> int:
        return sum(b.jobs_failed for b in self.backends)


@dataclass(frozen=True, slots=True)
class Totals:
    nodes: int
    nodes_up: int
    in_flight: int
    capacity: int
    """Of the nodes that are up: a down node's slots serve nobody."""
    queued: int
    tokens_per_s: float
    jobs_done: int
    jobs_failed: int


def totals_of(nodes: Sequence[NodeActivity]) -> Totals:
    up = [n for n in nodes if n.up]
    return Totals(
        nodes=len(nodes),
        nodes_up=len(up),
        in_flight=sum(n.in_flight for n in up),
        capacity=sum(n.capacity for n in up),
        # A down node's queue still holds jobs that wait for it (or for a client to move them).
        queued=sum(n.queued for n in nodes),
        tokens_per_s=sum(n.tokens_per_s or 0.0 for n in up),
        jobs_done=sum(n.jobs_done for n in nodes),
        jobs_failed=sum(n.jobs_failed for n in nodes),
    )


class ActivityTracker:
    """Keeps each backend's recent heartbeats between reads of the cluster, to derive rates.

    Reads may come faster or slower than beats: a read that finds the beat already held adds
    nothing, and a rate spans the beats of the last ``window_s`` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._readings: dict[tuple[str, str], deque[Reading]] = {}

    def update(self, nodes: Sequence[NodeState]) -> list[NodeActivity]:
        seen: set[tuple[str, str]] = set()
        activity = []
        for node in nodes:
            backends = []
            for backend in node.info.backends:
                key = (node.name, backend.name)
                seen.add(key)
                reading = Reading(node.info.instance, node.info.sent_at, backend.counters)
                rate = self._add(key, reading) if node.up else None
                backends.append(
                    BackendActivity(
                        name=backend.name,
                        kind=backend.kind,
                        healthy=backend.healthy,
                        in_flight=backend.in_flight,
                        capacity=backend.capacity,
                        latency_ms=backend.latency_ms,
                        tokens_per_s=rate,
                        jobs_done=backend.counters.jobs_done,
                        jobs_failed=backend.counters.jobs_failed,
                        quota_left=backend.quota_left,
                    )
                )
            activity.append(
                NodeActivity(
                    name=node.name,
                    up=node.up,
                    queued=node.queued,
                    in_flight=node.info.in_flight,
                    capacity=node.info.capacity,
                    sent_at=node.info.sent_at,
                    backends=tuple(backends),
                    cloud_providers=node.info.cloud_providers,
                )
            )
        for gone in set(self._readings) - seen:
            del self._readings[gone]  # forgotten nodes, removed backends
        return activity

    def _add(self, key: tuple[str, str], reading: Reading) -> float | None:
        held = self._readings.setdefault(key, deque())
        if held and held[-1].instance != reading.instance:
            held.clear()  # a restarted worker: its counters began again
        if not held or reading.sent_at > held[-1].sent_at:
            held.append(reading)
        newest = held[-1]
        # Keep the newest beat older than the window too: the rate then spans the whole window.
        while len(held) > 2 and held[1].sent_at <= newest.sent_at - self.window_s:
            held.popleft()
        return rate_between(held[0], newest) if len(held) > 1 else None
