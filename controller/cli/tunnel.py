"""``corral tunnel``: reach the broker over SSH from a node, reconnecting on its own."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from broker.errors import CorralError
from controller.cli.common import ExitCode, fail
from controller.tunnel import (
    DEFAULT_BROKER_PORT,
    Forward,
    Tunnel,
    TunnelConfig,
    default_state_file,
    parse_host_port,
    parse_reverse,
    parse_via,
)


@click.command()
@click.option(
    "--via", required=True, metavar="USER@HOST[:PORT]", help="The SSH server to go through."
)
@click.option(
    "--known-hosts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path.home() / ".ssh" / "known_hosts",
    show_default="~/.ssh/known_hosts",
    help="Host keys to trust (always checked).",
)
@click.option(
    "--identity",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key file (default: ~/.ssh/id_* and ssh-agent).",
)
@click.option(
    "--local-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_BROKER_PORT,
    show_default=True,
    help="Port on 127.0.0.1 that leads to the broker (the worker's CORRAL_BROKER_URL).",
)
@click.option(
    "--remote",
    default=f"127.0.0.1:{DEFAULT_BROKER_PORT}",
    show_default=True,
    metavar="HOST:PORT",
    help="The broker as the SSH host sees it.",
)
@click.option(
    "--reverse",
    multiple=True,
    metavar="RPORT:HOST:PORT",
    help="Also let the SSH host reach HOST:PORT here on its own 127.0.0.1:RPORT (repeatable).",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the tunnel's state is kept for `corral doctor` (default: under CORRAL_STATE_DIR).",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Longest wait between reconnect attempts, in seconds.",
)
def tunnel(
    via: str,
    known_hosts: Path,
    identity: Path | None,
    local_port: int,
    remote: str,
    reverse: tuple[str, ...],
    state_file: Path | None,
    max_backoff: float,
) -> None:
    """Forward a local port to the broker through an SSH server, reconnecting with backoff.

    Host keys are checked against known_hosts; there is no way to skip the check.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        user, host, port = parse_via(via)
        dest_host, dest_port = parse_host_port(remote, "--remote")
        config = TunnelConfig(
            host=host,
            port=port,
            user=user,
            known_hosts=known_hosts,
            identity=identity,
            local=(Forward("127.0.0.1", local_port, dest_host, dest_port),),
            reverse=tuple(parse_reverse(r) for r in reverse),
            backoff_max_s=max_backoff,
            state_file=state_file or default_state_file(host, port),
        )
        sys.exit(asyncio.run(_run(Tunnel(config))))
    except CorralError as exc:
        fail(exc)


async def _run(tunnel: Tunnel) -> int:
    task = asyncio.create_task(tunnel.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)  # stop cleanly: state file says "stopped"
    try:
        await task
    except asyncio.CancelledError:
        return ExitCode.OK
    return ExitCode.OK
