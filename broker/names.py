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
"""Hash of node name -> NodeInfo JSON, written when the node's inventory changes (its load
fields are those of that moment; the current load is in ``NODE_LOADS_HASH``). Kept after a
node dies so it can be shown as down."""

NODE_LOADS_HASH = f"{KEY_PREFIX}node-loads"
"""Hash of node name -> NodeLoad JSON (broker.nodeload), written at every heartbeat."""

NODE_DIGESTS_HASH = f"{KEY_PREFIX}node-digests"
"""Hash of node name -> digest of the inventory stored in ``NODES_HASH``: a controller that
knows it re-reads nothing else."""

CANCEL_CHANNEL = f"{KEY_PREFIX}cancel"
"""Pub/sub channel every worker listens on; a message is a job id to stop."""


MODEL_OP_TASK = "corral.model_op"
"""The task that pulls, loads, unloads or removes a model on one node."""

# Kombu's Redis transport keeps one list per priority step, named queue + separator + step
# (the step-0 list is the bare queue name) and, with the "priority" strategy, always pops the
# lowest step first. corral uses two steps: interactive jobs, then batch jobs.
PRIORITY_SEPARATOR = "\x06\x16"  # kombu's default: other kombu clients (Flower) agree
PRIORITY_STEPS = (0, 9)
INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 9


def node_queue(node_name: str) -> str:
    """The Celery queue that only ``node_name``'s worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{node_name}"


def node_queue_lists(node_name: str) -> list[str]:
    """The Redis lists that hold ``node_name``'s waiting jobs, highest priority first."""
    queue = node_queue(node_name)
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


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


def session_key(session_id: str) -> str:
    """Hash of a conversation: the node that holds it, and its messages so far."""
    return f"{KEY_PREFIX}session:{session_id}"


BREAKERS_HASH = f"{KEY_PREFIX}breakers"
"""Hash of breaker target (a node name, or ``node/backend``) -> its state, shared by every
controller process."""


def breaker_probe_key(target: str) -> str:
    """Held by the one controller allowed to try a half-open breaker's target."""
    return f"{KEY_PREFIX}breaker:{target}:probe"


SIM_CONTROL_CHANNEL = f"{KEY_PREFIX}sim:control"
"""Pub/sub channel a simulated fleet (``corral sim``) takes commands on: ``{"kill": [node]}``."""


ROUTES_HASH = f"{KEY_PREFIX}routes"
"""Hash of route name -> Route JSON (controller.routes): named endpoints behind ``@name``."""

ROUTING_OFF_KEY = f"{KEY_PREFIX}routes:off"
"""Present while routing is off (``corral route off``): ``@route`` is then refused. Absent (the
default), routes answer as soon as they are added."""


USAGE_TTL_S = 90 * 86400
"""How long a day's usage counters are kept (``corral usage --days`` reaches this far back)."""


def usage_day_key(day: str) -> str:
    """Hash of one UTC day's (``2026-12-02``) usage: per route or node, model and measure,
    a count (broker.usage spells the fields)."""
    return f"{KEY_PREFIX}usage:{day}"


RATE_COUNTERS_HASH = f"{KEY_PREFIX}rate-counters"
"""Hash of rate-limit scope (``anthropic``, ``anthropic|MODEL``) -> this minute's requests and
tokens (broker.ratelimits): shared by every worker and controller; expires when idle."""


def provider_limits_key(node_name: str, backend: str) -> str:
    """Hash of the rate-limit headers a provider last sent this node's backend (remaining
    requests and tokens, their resets), written by the node's heartbeat; short-lived."""
    return f"{KEY_PREFIX}node:{node_name}:provider-limits:{backend}"
