"""The front door: router, client (submit / stream / cancel) and the ``corral`` CLI."""

from controller.client import CorralClient, JobStreamReader, Submission, make_spec
from controller.router import Candidate, NodeState, rank_candidates, route

__all__ = [
    "Candidate",
    "CorralClient",
    "JobStreamReader",
    "NodeState",
    "Submission",
    "make_spec",
    "rank_candidates",
    "route",
]
