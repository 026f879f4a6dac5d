"""Every queue, channel, task and Redis key name corral uses, built in one place.

Both sides import these builders; no other module spells a ``corral:`` string, so a rename
here is a rename everywhere.
"""

from __future__ import annotations

KEY_PREFIX = "corral:"
NODE_QUEUE_PREFIX = "corral.node."

RUN_JOB_TASK = "corral.run_job"
"""The explicit Celery task name a worker registers and the controller sends."""

NODES_HASH = f"{KEY_PREFIX}nodes"
"""Hash of node name -> last NodeInfo JSON; kept after a node dies so it can be shown as down."""

CANCEL_CHANNEL = f"{KEY_PREFIX}cancel"
"""Pub/sub channel every worker listens on; a message is a job id to stop."""


def node_queue(node_name: str) -> str:
    """The Celery queue that only ``node_name``'s worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{node_name}"


def node_alive_key(node_name: str) -> str:
    """Expiring key whose presence means the node heartbeated recently."""
    return f"{KEY_PREFIX}node:{node_name}:alive"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying a job's live StreamEvents."""
    return f"{KEY_PREFIX}job:{job_id}:events"


def job_log_key(job_id: str) -> str:
    """List of a job's StreamEvents; index == sequence number, so gaps are refilled by range."""
    return f"{KEY_PREFIX}job:{job_id}:log"


def job_result_key(job_id: str) -> str:
    """The final JobResult JSON."""
    return f"{KEY_PREFIX}job:{job_id}:result"


def job_lease_key(job_id: str) -> str:
    """Held by the worker that streams a job, so a redelivered copy never streams twice."""
    return f"{KEY_PREFIX}job:{job_id}:lease"


def job_cancel_key(job_id: str) -> str:
    """Set when a job is cancelled, so a worker that picks it up later skips it."""
    return f"{KEY_PREFIX}job:{job_id}:cancel"


def job_node_key(job_id: str) -> str:
    """The node a job was sent to, so ``attach`` and ``cancel`` can find it."""
    return f"{KEY_PREFIX}job:{job_id}:node"
