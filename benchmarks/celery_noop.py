"""A plain Celery worker beside corral's, for ``benchmarks.throughput``: one no-op task.

It runs on corral's Celery settings (``broker.celery_app``: JSON, acks late, prefetch 1, the
same Redis transport) in the solo pool, as a capacity-1 node does, so the difference from a
corral node is corral's own work. The task's one INCR lets the benchmark see it finish.

``--bare`` builds the app from Celery alone, without corral's modules (no pydantic): what
Celery's own worker costs in memory, for ``benchmarks.footprint``.

    python -m benchmarks.celery_noop [--bare]   (with CORRAL_BROKER_URL set)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import redis
from celery import Celery

# Benchmark-only names: not part of corral's protocol, so not in broker/names.py.
NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
DONE_COUNTER = "bench:noop:done"


def main() -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "--bare" in sys.argv:
        url = os.environ["CORRAL_BROKER_URL"]
        app = Celery("bare", broker=url, set_as_current=False)
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_ignore_result=True,
            task_acks_late=True,
            worker_prefetch_multiplier=1,
            worker_hijack_root_logger=False,
            worker_redirect_stdouts=False,
        )
    else:
        from broker.celery_app import make_celery_app  # noqa: PLC0415 - not for --bare
        from broker.settings import build_settings  # noqa: PLC0415

        settings = build_settings()
        url = settings.broker_url.get_secret_value()
        app = make_celery_app(settings)
    counter = redis.Redis.from_url(url)

    @app.task(name=NOOP_TASK, acks_late=True, shared=False)  # type: ignore[untyped-decorator]
    def noop(*_args: Any) -> None:
        counter.incr(DONE_COUNTER)

    worker = app.Worker(
        hostname="noop@bench",
        queues=[NOOP_QUEUE],
        pool_cls="solo",
        concurrency=1,
        loglevel="INFO",
        without_mingle=True,
        without_gossip=True,
        send_events=False,
        quiet=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main())
