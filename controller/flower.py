"""Flower on the cluster's own Celery app: who may watch, where it listens, how it starts.

Flower can cancel and inspect every job, so it never listens beyond loopback without basic-auth
credentials. The credentials reach Flower through its ``FLOWER_BASIC_AUTH`` environment
variable, never through argv, so ``ps`` does not show them; corral's own Celery settings make
Flower's task list show ``job=… node=… model=…`` (the task's ``argsrepr``), never the prompt.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from dataclasses import dataclass

from pydantic import SecretStr

from broker.celery_app import make_celery_app
from broker.errors import ConfigError
from broker.settings import CorralSettings
from controller.bearer_auth import is_loopback

AUTH_ENV = "CORRAL_FLOWER_AUTH"
"""Where ``corral flower`` and ``corral doctor`` read ``user:password`` from."""

FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"
"""Flower's own variable for its ``--basic_auth`` option (read by Flower at start)."""

DEFAULT_PORT = 5555
LOOPBACK_ADDRESS = "127.0.0.1"
ALL_ADDRESSES = "0.0.0.0"


@dataclass(frozen=True)
class FlowerPlan:
    """Where Flower listens and who may log in; built by ``plan_flower``."""

    address: str
    port: int
    credentials: tuple[SecretStr, ...]

    @property
    def url(self) -> str:
        host = LOOPBACK_ADDRESS if self.address == ALL_ADDRESSES else self.address
        return f"http://{host}:{self.port}/"


def parse_credentials(value: str | None) -> tuple[SecretStr, ...]:
    """``user:password`` (several separated by commas, as Flower takes them); the error never
    repeats what was given, since it holds a password."""
    if value is None or not value.strip():
        return ()
    entries = [entry.strip() for entry in value.split(",")]
    for number, entry in enumerate(entries, start=1):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            where = "" if len(entries) == 1 else f" (entry {number})"
            raise ConfigError(
                f"Flower credentials must be user:password{where}, with neither part empty; "
                "a password cannot hold a comma"
            )
    return tuple(SecretStr(entry) for entry in entries)


def plan_flower(
    *, port: int, address: str | None, basic_auth: str | None, environ: dict[str, str]
) -> FlowerPlan:
    """Decide where Flower listens: with credentials on every interface unless told otherwise,
    without them on loopback only (anything else is refused)."""
    if basic_auth is None:
        # Flower's own variable counts too: whoever set it meant Flower to ask for a password.
        basic_auth = environ.get(AUTH_ENV) or environ.get(FLOWER_AUTH_ENV)
    credentials = parse_credentials(basic_auth)
    if address is None:
        address = ALL_ADDRESSES if credentials else LOOPBACK_ADDRESS
    if not credentials and not is_loopback(address):
        raise ConfigError(
            f"refusing to serve Flower on {address or 'every interface'} without credentials: "
            "anyone who can reach it could watch and cancel every job. Set "
            f"{AUTH_ENV}=user:password (or --basic-auth), or listen on {LOOPBACK_ADDRESS}"
        )
    return FlowerPlan(address=address, port=port, credentials=credentials)


def flower_argv(plan: FlowerPlan) -> list[str]:
    """The ``celery`` command line Flower is started with: no secret in it."""
    return ["flower", f"--port={plan.port}", f"--address={plan.address}"]


def serve_flower(settings: CorralSettings, plan: FlowerPlan) -> int:
    """Run Flower in this process on the cluster's Celery app until it is stopped.

    Needs the ``flower`` package (``pip install 'corral[monitor]'``).
    """
    if importlib.util.find_spec("flower") is None:  # an optional dependency
        raise ConfigError(
            "Flower is not installed: pip install 'corral[monitor]' (or pip install flower)"
        )
    if plan.credentials:
        os.environ[FLOWER_AUTH_ENV] = ",".join(c.get_secret_value() for c in plan.credentials)
    app = make_celery_app(settings)
    # Flower inspects workers from several threads at once (stats, queues, registered, conf)
    # and each call holds pooled broker connections while it waits for replies: with the
    # cluster's small pool (4) they starve each other, and enable_events never goes out.
    app.conf.broker_pool_limit = None
    code = app.start(flower_argv(plan))
    # Flower has stopped (its SIGTERM handler ran); a second SIGTERM while its threads wind
    # down should end the process quietly, not raise inside the interpreter's shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return int(code or 0)
