"""The library: router, clients (blocking and asyncio: submit / stream / cancel), job runs."""

from controller.aclient import AsyncCorralClient
from controller.ajobrun import AsyncJobRun
from controller.areader import AsyncJobStreamReader
from controller.client import CorralClient, make_spec
from controller.embedding import make_embed_spec
from controller.jobrun import JobRun
from controller.reader import JobStreamReader
from controller.router import Candidate, NodeState, candidates_for, rank_candidates

__all__ = [
    "AsyncCorralClient",
    "AsyncJobRun",
    "AsyncJobStreamReader",
    "Candidate",
    "CorralClient",
    "JobRun",
    "JobStreamReader",
    "NodeState",
    "candidates_for",
    "make_embed_spec",
    "make_spec",
    "rank_candidates",
]
