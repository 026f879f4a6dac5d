"""The front door: router, client (submit / stream / cancel) and the ``corral`` CLI."""

from controller.client import CorralClient, make_spec
from controller.jobrun import JobRun
from controller.reader import JobStreamReader
from controller.router import Candidate, NodeState, candidates_for, rank_candidates

__all__ = [
    "Candidate",
    "CorralClient",
    "JobRun",
    "JobStreamReader",
    "NodeState",
    "candidates_for",
    "make_spec",
    "rank_candidates",
]
