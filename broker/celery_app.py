"""The Celery app factory both sides use: the settings the design relies on, in one place."""

from __future__ import annotations

from celery import Celery

from broker import names
from broker.settings import CorralSettings
from broker.transport import (
    SENTINEL_TRANSPORT_PATH,
    TRANSPORT_PATH,
    use_corral_sentinel_transport,
)

# Seconds beyond the longest job before Redis hands an unacked job to another consumer.
_VISIBILITY_MARGIN_S = 60


def make_celery_app(settings: CorralSettings, *, name: str = "corral") -> Celery:
    """A Celery app bound to the broker in ``settings``; creates no connection until used."""
    url = settings.broker_url.get_secret_value()
    app = Celery(name, broker=url, set_as_current=False)
    if url.startswith(("redis://", "rediss://")):
        # A full or read-only Redis is a lost connection, not a reason to stop (broker.transport).
        app.conf.broker_transport = TRANSPORT_PATH
    elif url.startswith("sentinel://"):
        app.conf.broker_transport = SENTINEL_TRANSPORT_PATH
        use_corral_sentinel_transport()  # for the failover entries too
    transport_options: dict[str, object] = {}
    if url.startswith("sentinel://"):
        transport_options["master_name"] = settings.broker_master_name
    if url.startswith("rediss://") and settings.broker_ca_file:
        # The broker's certificate is checked against this CA (and its name against the host).
        # ssl is imported only here: a node on plain redis:// never loads it (footprint).
        import ssl  # noqa: PLC0415

        app.conf.broker_use_ssl = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": settings.broker_ca_file,
        }
    app.conf.update(
        # JSON only: a pickled message is refused by the worker, never executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results travel on corral's own stream and result key, not Celery's backend.
        task_ignore_result=True,
        # A job is acknowledged only when it has finished, and handed back if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s
            or int(settings.job_timeout_s) + _VISIBILITY_MARGIN_S,
            # Interactive jobs overtake batch jobs waiting in a node's queue: one Redis list
            # per step, the lowest step popped first (kombu's Redis "priority" strategy).
            "queue_order_strategy": "priority",
            "priority_steps": list(names.PRIORITY_STEPS),
            **transport_options,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Celery 5.7 lost the in-flight job on a Redis restart with this on (see DESIGN.md).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue="corral.default",
        task_create_missing_queues=True,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_pool_limit=4,
        task_time_limit=int(settings.job_timeout_s) + 30,
    )
    return app
