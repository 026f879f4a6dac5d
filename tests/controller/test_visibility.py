"""A job that outlasts the broker's visibility timeout.

kombu's Redis transport hands an unacknowledged message out again once it is older than the
visibility timeout, whether or not a worker is still running it (nothing extends it). So a long
answer *is* delivered a second time, to its node's queue; the copy finds the job's lease held
by the running attempt and writes nothing, and the answer streams once.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker import names
from broker.celery_app import make_celery_app
from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.controller.test_failover import assert_in_order_once, expected, sim, until
from tests.support.servers import running_workers, wait_until

VISIBILITY_S = 2


def test_a_job_longer_than_the_visibility_timeout_is_redelivered_and_the_copy_writes_nothing(
    broker_url: str, tmp_path: Path
) -> None:
    settings = build_settings(broker_url=broker_url, visibility_timeout_s=VISIBILITY_S)
    worker_env = {"CORRAL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)}
    node = ("a", sim("--capacity", "2", "--sim-token-ms", "300"))
    with (
        running_workers(broker_url, tmp_path, node, env=worker_env) as (a,),
        CorralClient(settings) as client,
    ):
        run = client.submit(make_spec("a long answer"))
        events = run.events(timeout_s=60)
        seen = until(events, 2)
        time.sleep(VISIBILITY_S + 0.5)
        # What kombu's consumers do every unacked_restore_interval: hand back every message
        # unacknowledged for longer than the visibility timeout. Run it now instead of waiting.
        with make_celery_app(settings).connection_for_write() as connection:
            connection.default_channel.qos.restore_visible(num=100, interval=1)
        received = f"corral.run_job[{run.job_id}] received"
        wait_until(lambda: a.log().count(received) == 2, 10, "the copy to reach the worker")
        seen += list(events)
        log_length = client.redis.llen(names.job_log_key(run.job_id))

    assert_in_order_once(seen)
    assert log_length == len(seen)  # the copy added nothing to the stream
    done = seen[-1]
    assert isinstance(done, DoneEvent) and done.result.text == expected("a long answer")
    assert [e.type for e in seen].count("started") == 1
