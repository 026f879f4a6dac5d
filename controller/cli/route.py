"""``corral route``: named endpoints behind ``@name``, kept in the cluster."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import httpx
import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.catalog import Catalog, catalog_for, provider_of
from broker.errors import BrokerUnavailable, ConfigError, CorralError
from broker.route_url import RouteTarget
from controller.cli.common import fail, settings_from
from controller.cli.limits_view import provider_headers_of, route_limit_notes
from controller.cli.render import breaker_notes, stderr_console
from controller.cluster import read_cluster, read_nodes
from controller.router import NodeState
from controller.routes import (
    Route,
    RouteStore,
    export_routes,
    make_route,
    missing_server_reason,
    parse_route_file,
    route_servers,
)

PROBE_TIMEOUT_S = 3.0


def _store(ctx: click.Context) -> RouteStore:
    url = settings_from(ctx).broker_url.get_secret_value()
    return RouteStore(redis.Redis.from_url(url, socket_connect_timeout=5))


@click.group("route")
def route_command() -> None:
    """Named routes: `@NAME` in a prompt goes to the route's endpoint and model."""


def _guard(error: Exception) -> CorralError:
    if isinstance(error, CorralError):
        return error
    return BrokerUnavailable(f"Redis: {error.__class__.__name__}")


@route_command.command("add")
@click.argument("name")
@click.argument("url")
@click.argument("model", required=False)
@click.pass_context
def add(ctx: click.Context, name: str, url: str, model: str | None) -> None:
    """Add route NAME to URL (ollama://, llamacpp://, anthropic://, ...), with MODEL."""
    try:
        route = make_route(name, url, model)
        _store(ctx).add(route)
    except (CorralError, redis.RedisError) as exc:
        fail(_guard(exc))
    note = "" if route.model else f" (no model: ask `@{route.name} --model M`)"
    click.echo(
        f"route @{route.name} -> {route.url}{' ' + route.model if route.model else ''}{note}"
    )


@route_command.command("rm")
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, name: str) -> None:
    """Remove route NAME."""
    try:
        removed = _store(ctx).remove(name)
    except redis.RedisError as exc:
        fail(_guard(exc))
    if not removed:
        fail(ConfigError(f"no route named {name!r}"))
    click.echo(f"removed route @{name.lower()}")


@route_command.command("on")
@click.pass_context
def on(ctx: click.Context) -> None:
    """Let `@route` mentions through (the default)."""
    _switch(ctx, True)


@route_command.command("off")
@click.pass_context
def off(ctx: click.Context) -> None:
    """Refuse `@route` mentions (nodes still answer to `@node`)."""
    _switch(ctx, False)


def _switch(ctx: click.Context, enabled: bool) -> None:
    try:
        _store(ctx).set_enabled(enabled)
    except redis.RedisError as exc:
        fail(_guard(exc))
    click.echo(f"routing {'on' if enabled else 'off'}")


@route_command.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """Whether routing is on, and how many routes there are."""
    try:
        store = _store(ctx)
        enabled, routes = store.enabled(), store.all()
    except redis.RedisError as exc:
        fail(_guard(exc))
    click.echo(f"routing {'on' if enabled else 'off'}, {len(routes)} route(s)")


def route_state(route: Route, nodes: list[NodeState]) -> tuple[str, str]:
    """(mark, note): ✓ reachable, ✗ unreachable (why), ? no worker holds the key."""
    up = [server for server in route_servers(route, nodes) if server.state.up]
    if up:
        healthy = [server for server in up if server.healthy]
        if healthy:
            return "✓", f"served by {', '.join(server.label for server in healthy)}"
        first = up[0]
        return "✗", f"{first.label}: {first.error or 'unhealthy'}"
    target = route.target
    if target.cloud:
        return "?", missing_server_reason(route)
    reason = _probe(target)
    if reason is None:
        return "✓", "reachable; no worker fronts it yet"
    return "✗", reason


def _probe(target: RouteTarget) -> str | None:
    """None when the endpoint answers its inventory request, else why not."""
    path = "/api/tags" if target.kind == "ollama" else "/v1/models"
    try:
        response = httpx.get(target.base_url + path, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{target.base_url}: {exc.__class__.__name__}"
    if response.status_code >= 400:
        return f"{target.base_url}: HTTP {response.status_code}"
    return None


@route_command.command("list")
@click.pass_context
def list_routes(ctx: click.Context) -> None:
    """Every route, checked live: ✓ reachable, ✗ unreachable, ? missing its API key."""
    cooldown_s = settings_from(ctx).breaker_cooldown_s
    try:
        store = _store(ctx)
        routes, enabled = store.all(), store.enabled()
        view = read_cluster(store.redis) if routes else None
        headers = provider_headers_of(store.redis, view) if view else {}
    except redis.RedisError as exc:
        fail(_guard(exc))
    nodes = list(view.nodes) if view else []
    notes = breaker_notes(view.breakers, view.redis_time, cooldown_s) if view else {}
    if not routes:
        stderr_console().print("no routes: add one with `corral route add NAME URL [MODEL]`")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("", "ROUTE", "URL", "MODEL", "STATE"):
        table.add_column(column)
    # Probed at once: a host that drops packets costs one timeout, not one per route.
    with ThreadPoolExecutor(max_workers=min(16, len(routes))) as pool:
        states = list(pool.map(lambda route: route_state(route, nodes), routes))
    for route, (mark, note) in zip(routes, states, strict=True):
        extra = route_limit_notes(
            [(server.state, server.backend) for server in route_servers(route, nodes)],
            notes,
            headers,
        )
        shown = "; ".join([note, *extra])
        table.add_row(mark, "@" + route.name, escape(route.url), route.model or "-", escape(shown))
    Console(width=200).print(table)
    if not enabled:
        stderr_console().print("routing is off: `corral route on` lets @route mentions through")


@route_command.command("caps")
@click.argument("name")
@click.pass_context
def caps(ctx: click.Context, name: str) -> None:
    """What route NAME is: its backend kind, endpoint, key, serving workers and model, and
    the model's row of the capability and price tables."""
    settings = settings_from(ctx)
    try:
        store = _store(ctx)
        route = store.get(name)
        nodes = read_nodes(store.redis)
        catalog = catalog_for(settings.capabilities, settings.prices)
    except (CorralError, redis.RedisError) as exc:
        fail(_guard(exc))
    if route is None:
        fail(ConfigError(f"no route named {name!r}"))
    target = route.target
    click.echo(f"route     @{route.name}")
    click.echo(f"kind      {target.kind} ({'cloud' if target.cloud else 'local'})")
    click.echo(f"endpoint  {target.base_url}")
    click.echo(f"model     {route.model or '(no model: ask with --model M)'}")
    if target.cloud:
        click.echo(f"key       {' or '.join(target.key_variables)} (in the serving worker's env)")
    for line in table_lines(catalog, target.kind, route.model):
        click.echo(line)
    serving = route_servers(route, nodes)
    for server in serving:
        backends = [b for b in server.state.info.backends if b.name == server.backend]
        models = [
            m for b in backends for m in b.models if route.model is None or m.name == route.model
        ]
        capabilities = sorted({c for m in models for c in m.capabilities}) or ["chat"]
        up = "up" if server.state.up else "down"
        click.echo(f"served by {server.label} ({up}): {', '.join(capabilities)}")
    if not serving:
        click.echo(f"served by nobody: {missing_server_reason(route)}")


def _tokens(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else f"{count:,}"


def table_lines(catalog: Catalog, kind: str, model: str | None) -> list[str]:
    """The capability and price table rows for ``model`` on a backend of ``kind``."""
    if model is None:
        return ["table     (no model on the route: capabilities depend on the model)"]
    caps = catalog.capabilities(kind, model)
    if caps is None:
        return [f"table     {model} is not in the capability table (corral.yaml may add it)"]
    flags = [
        f"{word} {'yes' if value else 'no' if value is not None else '?'}"
        for word, value in (
            ("tools", caps.tools),
            ("vision", caps.vision),
            ("thinking", caps.thinking),
            ("json", caps.json_output),
        )
    ]
    lines = [
        f"context   {_tokens(caps.context)} tokens · max output {_tokens(caps.max_output)}",
        f"can       {' · '.join(flags)}",
    ]
    price = catalog.price(kind, model)
    if price is not None:
        lines.append(
            f"price     ${price.input:g} in / ${price.output:g} out per million tokens (estimate)"
        )
    elif provider_of(kind) == "local":
        lines.append("price     local: not priced")
    else:
        lines.append("price     not in the price table")
    return lines


@route_command.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def export(ctx: click.Context, file: Path) -> None:
    """Write every route to FILE (YAML, or JSON for a .json name)."""
    try:
        routes = _store(ctx).all()
        file.write_text(export_routes(routes, file.name))
    except redis.RedisError as exc:
        fail(_guard(exc))
    except OSError as exc:
        fail(ConfigError(f"cannot write {file}: {exc.strerror}"))
    click.echo(f"exported {len(routes)} route(s) to {file}")


@route_command.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_(ctx: click.Context, file: Path) -> None:
    """Add (or replace) the routes in FILE."""
    try:
        routes = parse_route_file(file.read_text())
        store = _store(ctx)
        for route in routes:
            store.add(route, replace=True)
    except OSError as exc:
        fail(ConfigError(f"cannot read {file}: {exc.strerror}"))
    except (CorralError, redis.RedisError) as exc:
        fail(_guard(exc))
    click.echo(f"imported {len(routes)} route(s) from {file}")
