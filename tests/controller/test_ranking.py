"""The router's answer makes candidates as they are read, and reads as a sequence."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.ranking import Ranking
from controller.router import Candidate


def candidate(n: int) -> Candidate:
    return Candidate(f"node{n}", "ollama", "m", True, 1, 0)


class Counted:
    """Candidates 0..count-1, counting how many were made."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.made = 0

    def __iter__(self) -> Iterator[Candidate]:
        for n in range(self.count):
            self.made += 1
            yield candidate(n)


def test_the_first_candidate_is_made_alone() -> None:
    source = Counted(100)
    ranking = Ranking(source)
    assert ranking
    assert ranking[0].node == "node0"
    assert source.made == 1
    for c in ranking:
        if c.node == "node2":
            break
    assert source.made == 3
    assert [c.node for c in ranking[:4]] == ["node0", "node1", "node2", "node3"]
    assert source.made == 4


def test_it_reads_as_the_list_of_every_candidate() -> None:
    ranking = Ranking(Counted(5))
    expected = [candidate(n) for n in range(5)]
    assert ranking[-1] == expected[-1]
    assert len(ranking) == 5
    assert list(ranking) == expected
    assert ranking[1:4] == expected[1:4]
    assert ranking[::2] == expected[::2]
    assert candidate(3) in ranking
    assert ranking.index(candidate(2)) == 2


def test_an_empty_ranking_is_false_and_has_no_first() -> None:
    ranking = Ranking(Counted(0))
    assert not ranking
    assert len(ranking) == 0
    with pytest.raises(IndexError):
        ranking[0]
    assert next(iter(ranking), None) is None


def test_two_walks_share_what_is_made() -> None:
    source = Counted(3)
    ranking = Ranking(source)
    first, second = iter(ranking), iter(ranking)
    assert next(first).node == "node0"
    assert next(second).node == "node0"
    assert [c.node for c in first] == ["node1", "node2"]
    assert [c.node for c in second] == ["node1", "node2"]
    assert source.made == 3
