"""``corral acl``: the Redis ACL users a least-privilege cluster runs with."""

from __future__ import annotations

import os

import click
import redis

from broker import acl
from broker.errors import BrokerUnavailable, ConfigError
from broker.redis_clients import sync_client
from broker.settings import CorralSettings
from controller.cli.common import fail, settings_from


@click.command("acl")
@click.option(
    "--worker",
    "workers",
    multiple=True,
    metavar="NODE=VAR",
    help="A worker user for NODE, its password in environment variable VAR (repeatable).",
)
@click.option(
    "--controller",
    "controller_var",
    metavar="VAR",
    help="The controller user (CLI, gateway, Flower), its password in environment variable VAR.",
)
@click.option(
    "--admin",
    "admin_var",
    metavar="VAR",
    help="With --aclfile: the broker's admin (Redis's default user), its password in VAR.",
)
@click.option("--db", type=click.IntRange(0, 15), default=0, show_default=True)
@click.option("--apply", is_flag=True, help="Run the lines on the broker (an admin URL).")
@click.option(
    "--aclfile",
    is_flag=True,
    help="Print the lines of a Redis ACL file (redis.conf `aclfile`) instead of ACL SETUSER.",
)
@click.pass_context
def acl_command(
    ctx: click.Context,
    workers: tuple[str, ...],
    controller_var: str | None,
    admin_var: str | None,
    db: int,
    apply: bool,
    aclfile: bool,
) -> None:
    """Print (or --apply) ACL SETUSER lines: each worker may consume only its own queue and
    heartbeat only as itself; nobody may FLUSHALL, CONFIG, KEYS or MONITOR.

    Passwords are read from the environment and written as their SHA-256, never in clear.
    An ACL file replaces redis.conf's requirepass, so --aclfile needs --admin: the password
    replicas, Sentinel and redis-cli keep using. Workers then connect as
    redis://corral-worker-NODE:PASSWORD@host/DB, controllers as corral-controller.
    """
    try:
        users = [_worker(spec, db) for spec in workers]
        if controller_var:
            users.append((acl.CONTROLLER_USER, _password(controller_var), acl.controller_rules(db)))
        if not users:
            raise ConfigError("name at least one --worker NODE=VAR or --controller VAR")
        if aclfile:
            lines = _aclfile_lines(users, admin_var, apply)
        else:
            if admin_var:
                raise ConfigError("--admin goes with --aclfile (the default user of an ACL file)")
            lines = [acl.setuser_line(user, password, rules) for user, password, rules in users]
        if apply:
            _apply(settings_from(ctx), users)
    except (ConfigError, BrokerUnavailable) as exc:
        fail(exc)
    for line in lines:
        click.echo(line)


def _aclfile_lines(
    users: list[tuple[str, str, str]], admin_var: str | None, apply: bool
) -> list[str]:
    if apply:
        raise ConfigError(
            "--aclfile prints a file for redis.conf; --apply sets users on a live broker"
        )
    if not admin_var:
        raise ConfigError(
            "an ACL file replaces redis.conf's requirepass: name the admin password with"
            " --admin VAR"
        )
    admin = (acl.ADMIN_USER, _password(admin_var), acl.ADMIN_RULES)
    return [acl.aclfile_line(user, password, rules) for user, password, rules in (admin, *users)]


def _worker(spec: str, db: int) -> tuple[str, str, str]:
    node, sep, var = spec.partition("=")
    if not sep or not node or not var:
        raise ConfigError(f"--worker takes NODE=VAR, got {spec!r}")
    return acl.worker_user(node), _password(var), acl.worker_rules(node, db)


def _password(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"environment variable {var} (a user's password) is not set")
    return value


def _apply(settings: CorralSettings, users: list[tuple[str, str, str]]) -> None:
    client = sync_client(settings, max_connections=1)
    try:
        for user, password, rules in users:
            client.execute_command(*acl.setuser_args(user, password, rules))  # type: ignore[no-untyped-call]
    except redis.exceptions.RedisError as exc:
        raise BrokerUnavailable(f"could not set the ACL users: {exc}") from None
    finally:
        client.close()
