"""The front door: router, client (submit / stream / cancel) and the ``corral`` CLI."""

from controller.client import CorralClient, make_spec
from controller.jobrun import JobRun
from controller.reader import JobStreamReader
from controller.router import Candidate, NodeState, rank_candidates, candidates_for

__all__ = [
    "Candidate",
    "CorralClient",
    "JobRun",
    "JobStreamReader",
    "NodeState",
    "make_spec",
    "rank_candidates",
    "candidates_for",
]
