"""A routing query's candidates in rank order, made only as far as a job reads them.

A first decision in a view used to build every holder's ``Candidate`` and its sort key, then
sort them all (3.5-4.5 µs per candidate at 1,000 nodes, most of it reaching objects spread
over the heap). Now the inventory's part of the rank key (tier, then model loaded) groups a
query's holders once per inventory (``NodeIndex.ranking``), the load's part (spare capacity,
latency, jobs, names) is one int per backend and view (``NodeIndex.slots``), and a first
decision sorts each group's targets by slot in C. Candidates are made from the sorted targets as
the caller walks them (``Ranking``): a job's first candidate costs one, a failover the next.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

from controller.node_index import ModelHolder, NodeIndex, QueryRanking

if TYPE_CHECKING:
    from controller.router import Candidate


def in_rank_order(
    index: NodeIndex,
    ranking: QueryRanking,
    *,
    exclude_nodes: Collection[str] = (),
    blocked: Collection[str] = (),
    tags: frozenset[str] = frozenset(),
) -> Iterator[ModelHolder]:
    """``ranking``'s holders best first, one at a time, on ``index`` as it is now: the nodes
    sent jobs since the view was read (``requeued``) in their new places. Leaves out nodes in
    ``exclude_nodes`` or ``blocked``, ``node/backend`` targets in ``blocked``, and holders not
    meeting ``tags``."""
    slots = index.slots
    span = index.span
    by_target = ranking.group.by_target
    stale = index.requeued
    # Requeued holders as (prefix, slot, rank) packed in one int: their even slots fall between
    # the view's odd ones, and two sharing a slot are told apart by their rank among them.
    moved: list[tuple[int, ModelHolder]] = []
    if stale:
        for rank, (target, slot) in enumerate(index.requeued_slots().items()):
            holder = by_target.get(target)
            if holder is not None:
                moved.append(((holder.prefix * span + slot) * span + rank, holder))
        moved.sort(key=_first)
    filtered = bool(stale or exclude_nodes or blocked or tags)
    by_slot = slots.__getitem__
    order = index.in_slot_order
    next_moved = 0
    for bucket, (prefix, group_targets) in enumerate(ranking.group.buckets):
        targets = ranking.sorted_buckets[bucket]
        start = 0
        if targets is None:
            # Most jobs take the first candidate: find the bucket's best without sorting it,
            # by looking its targets up, or for a bucket holding many of the view's backends,
            # by walking the view's order to the first of them (about n / bucket steps).
            best = ranking.bests[bucket]
            if best is None:
                if len(group_targets) ** 2 > len(order):
                    best = next(filter(group_targets.__contains__, order), "")
                else:
                    best = min(group_targets, key=by_slot)
                    best = best if slots[best] != span else ""
                ranking.bests[bucket] = best
            if not best:
                continue  # no target of this bucket can take jobs in this view
            targets = [best]
        while start < len(targets):
            target = targets[start]
            start += 1
            slot = slots[target]
            if slot == span:
                break  # this and every later target cannot take jobs in this view
            if next_moved < len(moved):
                key = (prefix * span + slot) * span
                while next_moved < len(moved) and moved[next_moved][0] < key:
                    found = moved[next_moved][1]
                    next_moved += 1
                    if _kept(found, exclude_nodes, blocked, tags):
                        yield found
            holder = by_target[target]
            if not filtered or (
                holder.node not in stale and _kept(holder, exclude_nodes, blocked, tags)
            ):
                yield holder
            if start == len(targets) and len(targets) < len(group_targets):
                # The caller read past the best: rank the bucket whole (kept for the view).
                targets = sorted(group_targets, key=by_slot)
                ranking.sorted_buckets[bucket] = targets
    for _, found in moved[next_moved:]:
        if _kept(found, exclude_nodes, blocked, tags):
            yield found


def _first(pair: tuple[int, ModelHolder]) -> int:
    return pair[0]


def _kept(
    holder: ModelHolder,
    exclude_nodes: Collection[str],
    blocked: Collection[str],
    tags: frozenset[str],
) -> bool:
    return (
        holder.node not in exclude_nodes
        and holder.node not in blocked
        and holder.target not in blocked
        and tags <= holder.provides
    )


class Ranking(Sequence["Candidate"]):
    """Candidates best first, made as they are read: ``ranking[0]`` or a loop that stops at
    the first it can use makes only those; ``len``, ``list`` or a negative index make them
    all. Not for sharing between threads (each decision makes its own)."""

    __slots__ = ("_made", "_rest")

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self._made: list[Candidate] = []
        self._rest: Iterator[Candidate] | None = iter(candidates)

    def _make(self, count: int | None) -> None:
        """Make candidates until ``count`` are made (None: all of them)."""
        rest = self._rest
        if rest is None:
            return
        made = self._made
        if count is None:
            made.extend(rest)
        else:
            while len(made) < count:
                found = next(rest, None)
                if found is None:
                    break
                made.append(found)
            else:
                return
        self._rest = None

    @overload
    def __getitem__(self, index: int) -> Candidate: ...
    @overload
    def __getitem__(self, index: slice) -> list[Candidate]: ...
    def __getitem__(self, index: int | slice) -> Candidate | list[Candidate]:
        if isinstance(index, slice):
            start, stop = index.start or 0, index.stop
            # A slice from the front (``ranking[:3]``) makes only what it takes.
            whole = stop is None or stop < 0 or start < 0
            self._make(None if whole else stop)
            return self._made[index]
        self._make(index + 1 if index >= 0 else None)
        return self._made[index]

    def __len__(self) -> int:
        self._make(None)
        return len(self._made)

    def __bool__(self) -> bool:
        self._make(1)
        return bool(self._made)

    def __iter__(self) -> Iterator[Candidate]:
        position = 0
        while True:
            if position >= len(self._made):
                self._make(position + 1)
                if position >= len(self._made):
                    return
            yield self._made[position]
            position += 1

    def __repr__(self) -> str:
        more = ", ..." if self._rest is not None else ""
        return f"Ranking([{', '.join(map(repr, self._made))}{more}])"
