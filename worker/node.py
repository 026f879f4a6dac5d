"""Starting a node worker: the runtime, the task, and Celery's consumer on the node's queue."""

from __future__ import annotations

import logging
import socket

from broker import names
from broker.celery_app import make_celery_app
from broker.settings import CorralSettings, redacted_url
from worker.config import WorkerConfig
from worker.runtime import NodeRuntime
from worker.tasks import register_model_op_task, register_tasks

log = logging.getLogger(__name__)


def serve(settings: CorralSettings, config: WorkerConfig, *, loglevel: str = "INFO") -> int:
    """Run the node until it is told to stop; returns the process exit code.

    Raises BrokerUnavailable before consuming anything when Redis cannot be used.
    """
    runtime = NodeRuntime(settings, config)
    runtime.start()
    log.info(
        "node %s up: broker %s, queue %s, backends %s, tags %s",
        config.name,
        redacted_url(settings.broker_url.get_secret_value()),
        names.node_queue(config.name),
        ", ".join(f"{b.name} ({b.kind})" for b in runtime.backends.values()),
        ",".join(sorted(config.tags)) or "-",
    )
    capacity = runtime.capacity or config.capacity
    app = make_celery_app(settings)
    register_tasks(app, runtime)
    register_model_op_task(app, runtime)
    try:
        worker = app.Worker(
            hostname=f"{config.name}@{socket.gethostname()}",
            queues=[names.node_queue(config.name)],
            # One job at a time runs in Celery's own consumer thread (solo): one thread hop
            # fewer before the first token. More capacity needs the thread pool.
            pool_cls="solo" if capacity == 1 else "threads",
            concurrency=capacity,
            loglevel=loglevel,
            without_mingle=True,
            without_gossip=True,
            send_events=settings.task_events,
            quiet=True,
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        runtime.stop()
