"""Celery's publish with a producer kept between jobs.

``app.send_task`` without a producer takes one from kombu's producer pool and hands it back
for every message. A client holds one instead and publishes on it under a lock; a thread that
finds it busy publishes the ordinary way (from the pool), so concurrent sends never queue
behind each other. The held producer is one of the pool's, on the pool's connection: on a
lost connection kombu's retry reconnects it exactly as it would a pooled one. Measured on the
project's VM (interleaved, 30 x 100 publishes): 188 -> 163 us per publish at the median.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery


class HeldPublisher:
    def __init__(self, app: Celery) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._producer: Any = None

    def send_task(self, name: str, **kwargs: Any) -> None:
        if not self._lock.acquire(blocking=False):
            self._app.send_task(name, **kwargs)  # another thread is publishing on it
            return
        try:
            if self._producer is None:
                self._producer = self._app.producer_pool.acquire(block=True)
            try:
                self._app.send_task(name, producer=self._producer, **kwargs)
            except BaseException:
                # What kombu's retry could not mend: back to the pool, as after any publish,
                # and the next send starts from a pooled producer again.
                self._release()
                raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Hand the producer back to the pool (before the app's pools are closed)."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.release()
