"""``python -m controller.mcp``: serve MCP on stdio or streamable HTTP; install into a host.

``corral mcp ARGS`` hands its process over to this (front doors never import each other).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Scope

from broker.errors import CorralError
from broker.settings import CorralSettings, build_settings
from controller.aclient import AsyncCorralClient
from controller.bearer_auth import CHALLENGE, RequireBearer, api_keys, keys_missing_message
from controller.config_watch import ConfigWatch
from controller.mcp.install import (
    HOSTS,
    Host,
    config_path,
    install,
    server_entry,
    snippet,
    uninstall,
)
from controller.mcp.jobs import JobBook
from controller.mcp.server import CorralServer, build_server
from controller.router import NodeState
from controller.tracing import make_tracing

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_ANY_ADDRESS = ("0.0.0.0", "::", "[::]")  # not a name a client writes in Host


def _host_patterns(name: str) -> list[str]:
    """A Host header value and its any-port pattern: ``name`` (port 80/443) and ``name:*``."""
    if name.count(":") > 1 and not name.startswith("["):
        name = f"[{name}]"  # a bare IPv6 address, as a Host header writes it
    host, _, port = name.rpartition(":") if name.rfind(":") > name.rfind("]") else (name, "", "")
    return [name] if port else [host, f"{host}:*"]


def transport_security(host: str, allowed: tuple[str, ...]) -> TransportSecuritySettings:
    """DNS-rebinding protection: only requests whose Host header names this server (and whose
    Origin, when a browser sends one, is the same name) are served; others get 421 / 403."""
    names = [*_LOOPBACK_NAMES, *(n for n in (host, *allowed) if n not in _ANY_ADDRESS)]
    hosts = list(dict.fromkeys(p for n in names for p in _host_patterns(n)))
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


async def serve(
    config: ConfigWatch, http_port: int | None, host: str, allowed: tuple[str, ...]
) -> None:
    tracing = make_tracing(config.current(), "corral-mcp")
    async with AsyncCorralClient(config.current(), config=config, tracing=tracing) as client:
        try:
            nodes: list[NodeState] = await client.nodes()
        except CorralError as exc:  # Redis may come up later: every tool reads it afresh
            click.echo(f"corral mcp: cannot read the cluster yet: {exc}", err=True)
            nodes = []
        book = JobBook(client)
        server = build_server(client, book, nodes)
        # Reloads corral.yaml and announces tools/list_changed when the listing changes.
        watching = asyncio.create_task(server.changes.run())
        try:
            if http_port is None:
                await server.run_stdio_async()
            else:
                await _serve_http(server, http_port, host, allowed)
        finally:
            watching.cancel()
            await book.aclose()
            tracing.shutdown()


def _refuse_without_key(scope: Scope) -> ASGIApp:
    return JSONResponse(
        {"error": "a valid API key is required (Authorization: Bearer KEY; see CORRAL_API_KEYS)"},
        401,
        {"WWW-Authenticate": CHALLENGE},
    )


async def _serve_http(server: CorralServer, port: int, host: str, allowed: tuple[str, ...]) -> None:
    """Streamable HTTP at /mcp, behind the gateway's bearer-token check when keys are set."""
    keys = api_keys()
    app = RequireBearer(
        server.streamable_http_app(transport_security=transport_security(host, allowed), host=host),
        keys,
        _refuse_without_key,
    )
    click.echo(
        f"corral mcp: streamable HTTP at http://{host}:{port}/mcp"
        f"{', API keys required' if keys else ''}",
        err=True,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    await uvicorn.Server(config).serve()


def _settings() -> CorralSettings:
    try:
        return build_settings()
    except CorralError as exc:
        raise click.ClickException(str(exc)) from None


def _config() -> ConfigWatch:
    try:
        return ConfigWatch.from_environment()
    except CorralError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--http",
    "http_port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve streamable HTTP on PORT (path /mcp) instead of stdio.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (HTTP).")
@click.option(
    "--allow-host",
    "allowed",
    multiple=True,
    metavar="NAME",
    help="Another Host header to accept (HTTP; loopback names always are). Repeatable.",
)
@click.pass_context
def main(ctx: click.Context, http_port: int | None, host: str, allowed: tuple[str, ...]) -> None:
    """corral's MCP server (stdio, or --http PORT); install adds it to an MCP host."""
    if ctx.invoked_subcommand is not None:
        return
    if http_port is not None and (refusal := keys_missing_message("corral mcp", host)):
        raise click.UsageError(refusal)
    asyncio.run(serve(_config(), http_port, host, allowed))


_HOST_OPTION = click.option(
    "--host", "app", type=click.Choice(HOSTS), required=True, help="The MCP host to configure."
)


@main.command("install")
@_HOST_OPTION
@click.option("--write", is_flag=True, help="Write the entry into the host's config file.")
def install_command(app: Host, write: bool) -> None:
    """Print (or --write) the host's config entry that starts corral's MCP server."""
    entry = server_entry(app, _settings())
    path = config_path(app, Path.home())
    if not write:
        click.echo(f"# add to {path} (or run again with --write):")
        click.echo(snippet(entry))
        return
    try:
        click.echo(install(path, entry).message)
    except CorralError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("uninstall")
@_HOST_OPTION
def uninstall_command(app: Host) -> None:
    """Remove corral's entry from the host's config file."""
    try:
        click.echo(uninstall(config_path(app, Path.home())).message)
    except CorralError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
