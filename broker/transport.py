"""kombu's Redis transport, made to wait out a Redis that cannot take writes for a while.

A Redis at ``maxmemory`` under ``noeviction`` answers writes with OOM, and a replica that a
Sentinel failover has not yet promoted answers them with READONLY. kombu counts both as channel
errors, which costs corral its worker twice over:

- an ack that meets one stops Celery's consumer for good ("Unrecoverable error") and the
  worker exits. As connection errors, Celery logs the failed ack and carries on, and a fetch
  that meets one makes it reconnect with its retry backoff;
- a failed ack leaves the delivery in kombu's local QoS, and with a prefetch of 1 the consumer
  then never fetches again. Here the delivery is forgotten locally all the same; its copy in
  Redis's unacked set is handed back after the visibility timeout and does nothing, since the
  job's lease no longer admits that attempt.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import OutOfMemoryError, ReadOnlyError

TRANSPORT_PATH = "broker.transport:RedisTransport"
"""What Celery's ``broker_transport`` names, so kombu loads this class for redis:// URLs."""

_WRITES_REFUSED = (OutOfMemoryError, ReadOnlyError)

log = logging.getLogger(__name__)


class _QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            super().reject(delivery_tag, requeue=True)  # type: ignore[no-untyped-call]
        else:
            self._forget(delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        except _WRITES_REFUSED as exc:
            log.warning(
                "Redis refused to drop message %s from its unacked set (%s); it comes back after"
                " the visibility timeout and is skipped then",
                delivery_tag,
                exc,
            )
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]


class _Channel(kombu_redis.Channel):
    QoS = _QoS


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, *_WRITES_REFUSED)
