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
  job's lease no longer admits that attempt;
- and when Redis restarts, Celery closes the lost connection, kombu's close tries to hand the
  unacked messages back through a connection whose settings are already gone, and the
  AttributeError ("'NoneType' object has no attribute 'hostname'") stopped the worker now and
  then; so did the ack of a job that ran across the restart, sent on the old channel. Both are
  skipped then, and the visibility timeout hands the message back (a finished job's copy is
  refused by its lease).

It also keeps one Redis client per channel where kombu builds a new one for every publish,
ack and queue-length read (``conn_or_acquire``): the client holds no connection of its own
(each command borrows one from the channel's pool, as before), and building it costs about
50 us of Python each time, twice or more per job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError

TRANSPORT_PATH = "broker.transport:RedisTransport"
"""What Celery's ``broker_transport`` names, so kombu loads this class for redis:// URLs."""
SENTINEL_TRANSPORT_PATH = "broker.transport:SentinelTransport"
"""The same for sentinel:// URLs: kombu's Sentinel transport with the same tolerance."""

_WRITES_REFUSED = (OutOfMemoryError, ReadOnlyError)
PROMOTION_WAIT_S = 10.0
"""How long a Sentinel connection attempt keeps asking for a primary before it fails (and
Celery's own backoff takes over): longer than a failover tuned as the README says."""

log = logging.getLogger(__name__)


class _QoS(kombu_redis.QoS):
    def restore_unacked(self, client: object = None) -> None:
        if client is None and not self._connected():
            # Celery closes a connection it has lost, and kombu's close hands the channel's
            # unacked messages back to their queues; by then the connection's settings are
            # gone, no Redis client can be made, and the AttributeError stopped the worker
            # ("Error on stopping Hub"). The messages stay in Redis's unacked set, handed back
            # after the visibility timeout; a running job's copy is refused by its lease.
            log.warning(
                "broker connection lost: %d unacked job(s) left for the visibility"
                " timeout to hand back",
                len(self._delivered),
            )
            return
        super().restore_unacked(client)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            super().reject(delivery_tag, requeue=True)  # type: ignore[no-untyped-call]
        else:
            self._forget(delivery_tag)

    def _connected(self) -> bool:
        """Whether this channel's connection still has its settings (kombu clears them when
        Celery closes a connection it lost)."""
        transport = self.channel.connection
        return transport is not None and transport.client is not None

    def _forget(self, delivery_tag: str) -> None:
        if not self._connected():
            # A job that ran across a Redis restart finishes after Celery replaced the
            # connection it came on; the old channel can make no client (the AttributeError
            # stopped the worker). Its copy in the unacked set comes back after the visibility
            # timeout and is skipped then: the job is over.
            log.info(
                "message %s came on a lost connection: left to the visibility timeout", delivery_tag
            )
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            return
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
    _held_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        held = self._held_client
        # A channel whose pool was replaced (kombu drops it on close) gets a client on the new
        # pool; redis-py's client is safe to share between threads (it borrows connections).
        if held is None or held.connection_pool is not self.pool:
            held = self._held_client = self._create_client()  # type: ignore[no-untyped-call]
        yield held


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, *_WRITES_REFUSED)


class _SentinelChannel(_Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it asks the sentinels for the primary) with the held client
    and the QoS above. During a failover the old primary's replicas answer READONLY until one
    is promoted: a lost connection, as above, not a reason to stop."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = _SentinelChannel
    connection_errors = (*kombu_redis.SentinelTransport.connection_errors, *_WRITES_REFUSED)

    def establish_connection(self) -> Any:
        # Until the sentinels agree the primary is down they still name it (refused), then
        # they name none until a replica is promoted. Celery's consumer sleeps 2 s, 4 s,
        # 6 s... between attempts (its backoff is fixed), and a promotion 2 s in was taken up
        # 6 s in; asking again every quarter second for a while connects as soon as the
        # replica is promoted.
        deadline = time.monotonic() + PROMOTION_WAIT_S
        while True:
            try:
                return super().establish_connection()  # type: ignore[no-untyped-call]
            except (RedisConnectionError, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.25)


def use_corral_sentinel_transport() -> None:
    """Make ``sentinel://`` name corral's transport in this process.

    Celery treats each ``;`` entry of a broker URL as a failover alternative, and kombu's
    switch to the next one reads the transport from the URL's scheme again, dropping the
    ``broker_transport`` setting: a worker was back on kombu's stock Sentinel transport (no
    OOM/READONLY tolerance) after its first reconnect."""
    kombu_transports.TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT_PATH
