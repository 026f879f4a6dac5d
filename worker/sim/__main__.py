"""``corral sim``: run a simulated fleet (``python -m worker.sim`` is the same)."""

from __future__ import annotations

import logging
import socket
import sys

import click

from broker.celery_app import make_celery_app
from broker.errors import CorralError
from broker.settings import build_settings, redacted_url
from worker.sim.fleet import MAX_THREADS, SimFleet
from worker.sim.profiles import fleet_profiles
from worker.tasks import register_model_op_task, register_tasks

log = logging.getLogger("worker.sim")


@click.command(name="sim", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", type=click.IntRange(1, 5000), default=10, show_default=True)
@click.option("--models-per-node", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same fleet.")
@click.option("--prefix", default="sim", show_default=True, help="Node names: PREFIX000...")
@click.option("--first-token-ms", type=click.FloatRange(min=0), default=20.0, show_default=True)
@click.option("--token-ms", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option(
    "--slow",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Share of nodes ten times slower to the first token.",
)
@click.option(
    "--failing",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of nodes whose backend fails every chat.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    help=f"Jobs running at once across the fleet (default: its capacity, at most {MAX_THREADS}).",
)
@click.option("--broker", help="Redis URL (default: CORRAL_BROKER_URL).")
@click.option("--heartbeat", type=float, help="Seconds between each node's heartbeats.")
@click.option(
    "--loglevel",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def sim_command(
    nodes: int,
    models_per_node: int,
    seed: int,
    prefix: str,
    first_token_ms: float,
    token_ms: float,
    slow: float,
    failing: float,
    threads: int | None,
    broker: str | None,
    heartbeat: float | None,
    loglevel: str,
) -> None:
    """Run NODES simulated node agents in this process, each with its own queue, heartbeat,
    models, capacity and pace, against the real broker: the controller sees a fleet.

    A node is killed (it stops as a crashed machine would) by publishing
    {"kill": ["sim003"]} on the Redis channel corral:sim:control.
    """
    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = build_settings(broker_url=broker, heartbeat_interval_s=heartbeat)
        profiles = fleet_profiles(
            nodes,
            models_per_node=models_per_node,
            seed=seed,
            prefix=prefix,
            first_token_s=first_token_ms / 1000,
            token_s=token_ms / 1000,
            slow_fraction=slow,
            failing_fraction=failing,
        )
        fleet = SimFleet(settings, profiles, threads=threads)
        fleet.start()
    except CorralError as exc:
        click.echo(f"corral sim: {exc}", err=True)
        sys.exit(2)
    try:
        app = make_celery_app(settings)
        register_tasks(app, fleet)
        register_model_op_task(app, fleet)
        concurrency = fleet.threads
        # Printed before Celery's own "ready.": the fleet's nodes are heartbeating already.
        click.echo(
            f"corral sim: {nodes} nodes ({prefix}...), {fleet.capacity} job slots, "
            f"{concurrency} threads, broker {redacted_url(settings.broker_url.get_secret_value())}",
            err=True,
        )
        worker = app.Worker(
            hostname=f"{prefix}-fleet@{socket.gethostname()}",
            queues=fleet.queues,
            pool_cls="threads",
            concurrency=concurrency,
            loglevel=loglevel.upper(),
            without_mingle=True,
            without_gossip=True,
            send_events=settings.task_events,
            quiet=True,
        )
        worker.start()
        code = int(worker.exitcode or 0)
    finally:
        fleet.stop()
    sys.exit(code)


def main() -> None:
    sim_command(prog_name="corral sim")


if __name__ == "__main__":
    main()
