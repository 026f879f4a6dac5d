"""A plain Celery worker beside corral's, for ``benchmarks.throughput``: one no-op task.

It runs on corral's Celery settings (``broker.celery_app``: JSON, acks late, prefetch 1, the
same Redis transport) in the solo pool, as a capacity-1 node does, so the difference from a
corral node is corral's own work. The task's one INCR lets the benchmark see it finish.

    python -m benchmarks.celery_noop   (with CORRAL_BROKER_URL set)
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import redis

from broker.celery_app import make_celery_app
from broker.settings import build_settings

# Benchmark-only names: not part of corral's protocol, so not in broker/names.py.
NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
DONE_COUNTER = "bench:noop:done"


def main() -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = build_settings()
    app = make_celery_app(settings)
    counter = redis.Redis.from_url(settings.broker_url.get_secret_value())

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
