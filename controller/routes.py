"""Named routes (``@name``): endpoints kept in Redis, so every controller process agrees.

A route is a name, a URL (``broker.route_url`` reads it) and maybe a model. ``@name`` resolves
to a route first, then to a node. A route runs where its endpoint is served: on a node that
fronts a backend at the route's URL (a local Ollama or llama.cpp, or a cloud provider's
endpoint a worker is configured for), or, for a cloud route, on any worker started with
``--cloud`` that holds the provider's key (it builds the adapter when a job comes). The job
carries the route's URL (``JobSpec.route_url``), so the router keeps to those nodes when it
moves a job on.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from broker import names
from broker.errors import ConfigError, RoutingError, UnknownNode
from broker.redis_clients import decoded
from broker.route_url import (
    RouteTarget,
    fronting_backends,
    on_demand_backend,
    parse_route_url,
    serves_on_demand,
)
from broker.schemas import describe_validation_error
from controller.router import NodeState

_ROUTE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_SECRET_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


class Route(BaseModel):
    """One named endpoint, as stored in ``ROUTES_HASH`` and exported to a file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_ROUTE_NAME.pattern)
    url: str = Field(min_length=1, max_length=512)
    model: str | None = Field(default=None, min_length=1, max_length=256)

    @property
    def target(self) -> RouteTarget:
        return parse_route_url(self.url)


def check_route_name(name: str) -> str:
    """The name in lowercase, or ConfigError if it is not letters, digits and hyphens."""
    normal = name.strip().lower()
    if not _ROUTE_NAME.match(normal):
        raise ConfigError(
            f"route name {name!r}: letters, digits and hyphens only (not first or last), "
            "at most 64 characters"
        )
    return normal


def make_route(name: str, url: str, model: str | None = None) -> Route:
    """A checked route: its name normalized and its URL parsed (ConfigError otherwise)."""
    parse_route_url(url)
    return Route(name=check_route_name(name), url=url.strip(), model=model or None)


class RouteStore:
    """The cluster's routes and the routing switch, in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def add(self, route: Route, *, replace: bool = False) -> None:
        """Store ``route``; ConfigError if its name is a node's or taken (unless ``replace``)."""
        if self.redis.hexists(names.NODES_HASH, route.name):
            raise ConfigError(f"{route.name!r} is a node's name: a route may not shadow it")
        if replace:
            self.redis.hset(names.ROUTES_HASH, route.name, route.model_dump_json())
        elif not self.redis.hsetnx(names.ROUTES_HASH, route.name, route.model_dump_json()):
            raise ConfigError(f"route {route.name!r} exists: `corral route rm {route.name}` first")

    def remove(self, name: str) -> bool:
        return bool(self.redis.hdel(names.ROUTES_HASH, name.strip().lower()))

    def get(self, name: str) -> Route | None:
        raw = self.redis.hget(names.ROUTES_HASH, name.strip().lower())
        return None if raw is None else Route.model_validate_json(raw)

    def all(self) -> list[Route]:
        raw = self.redis.hgetall(names.ROUTES_HASH)
        routes = [Route.model_validate_json(value) for value in raw.values()]
        return sorted(routes, key=lambda r: r.name)

    def enabled(self) -> bool:
        return not self.redis.exists(names.ROUTING_OFF_KEY)

    def set_enabled(self, on: bool) -> None:
        if on:
            self.redis.delete(names.ROUTING_OFF_KEY)
        else:
            self.redis.set(names.ROUTING_OFF_KEY, "1")


# --- export and import ---------------------------------------------------------------------


def export_routes(routes: Sequence[Route], path: str) -> str:
    """The routes as YAML (or JSON when ``path`` ends in .json)."""
    data = {"routes": [r.model_dump(exclude_none=True) for r in routes]}
    if path.endswith(".json"):
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def parse_route_file(text: str) -> list[Route]:
    """Routes from an exported file; ConfigError for bad YAML/JSON, a bad route or a secret
    written in clear (a value with "key" or "token" in its name must be a ``${VAR}``)."""
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"route file is neither YAML nor JSON: {exc.__class__.__name__}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
        raise ConfigError("a route file holds `routes:`, a list of {name, url, model}")
    routes: list[Route] = []
    for i, item in enumerate(data["routes"]):
        if not isinstance(item, dict):
            raise ConfigError(f"routes[{i}] is not a mapping of name, url, model")
        for key, value in item.items():
            secretish = any(word in str(key).lower() for word in ("key", "token", "secret"))
            if secretish and not _SECRET_REFERENCE.match(str(value)):
                raise ConfigError(f"routes[{i}].{key}: write secrets as ${{VAR}}, never in clear")
        try:
            routes.append(
                make_route(str(item.get("name", "")), str(item.get("url", "")), item.get("model"))
            )
        except ValidationError as exc:
            raise ConfigError(f"routes[{i}]: {describe_validation_error(exc)}") from None
        except ConfigError as exc:
            raise ConfigError(f"routes[{i}]: {exc}") from None
    return routes


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """What ``@name`` means: a node to pin, or a route (its URL and model) to serve."""

    node: str | None
    model: str | None = None
    route: Route | None = None

    @property
    def route_name(self) -> str | None:
        return self.route.name if self.route else None

    @property
    def route_url(self) -> str | None:
        """What the job carries (``JobSpec.route_url``) so it runs only where the route is
        served: a route pins no node, so the job can move among its servers."""
        return self.route.url if self.route else None


@dataclass(frozen=True)
class RouteServer:
    """A node able to serve a route: with its own backend at the route's URL, or (``own``
    False) as a ``--cloud`` worker that builds the provider's adapter when a job comes."""

    state: NodeState
    backend: str
    own: bool
    healthy: bool = True
    error: str | None = None

    @property
    def label(self) -> str:
        how = "" if self.own else " (--cloud)"
        return f"{self.state.name}/{self.backend}{how}"


def route_servers(route: Route, nodes: Iterable[NodeState]) -> list[RouteServer]:
    """Every node that can serve ``route``, up and healthy ones first."""
    target = route.target
    found: list[RouteServer] = []
    for state in nodes:
        own = fronting_backends(target, state.info.backends)
        found += [RouteServer(state, b.name, True, b.healthy, b.error) for b in own]
        if not own and serves_on_demand(target, state.info):
            found.append(RouteServer(state, on_demand_backend(target.kind), False))
    return sorted(found, key=lambda s: (not s.state.up, not s.healthy, s.state.name))


def missing_server_reason(route: Route) -> str:
    """Why no worker serves ``route``, and what to start so one does."""
    return route.target.missing_worker_reason()


def resolve_mention(
    name: str, store: RouteStore, nodes: Sequence[NodeState], *, model: str | None = None
) -> Mention:
    """``@name`` -> a route's serving node and model, else the node of that name.

    Raises ConfigError (routing off, or a route with no model and none given), RoutingError
    (no worker serves the route: exit code 3) or UnknownNode listing the close matches.
    """
    route = store.get(name)
    enabled = store.enabled() if route is not None else True
    names_known = (
        [] if route is not None or _is_node(name, nodes) else [r.name for r in store.all()]
    )
    return choose_mention(name, route, enabled, names_known, nodes, model)


async def aresolve_mention(
    name: str, redis: AsyncRedis, nodes: Sequence[NodeState], *, model: str | None = None
) -> Mention:
    """``resolve_mention`` over an asyncio Redis client (the MCP server), on the route table
    as it is now (the gateway keeps one for ``route_cache_s``: ``AsyncRouteCache``)."""
    return (await aread_route_table(redis)).mention(name, nodes, model=model)


@dataclass(frozen=True)
class RouteTable:
    """Every stored route and the routing switch, as read from Redis at one moment."""

    stored: Mapping[str, str]
    """Each route's JSON by name, parsed only when a request names it."""
    enabled: bool
    _parsed: dict[str, Route] = field(default_factory=dict, compare=False, repr=False)

    def get(self, name: str) -> Route | None:
        key = name.strip().lower()
        route = self._parsed.get(key)
        if route is None and key in self.stored:
            route = self._parsed[key] = Route.model_validate_json(self.stored[key])
        return route

    def mention(self, name: str, nodes: Sequence[NodeState], *, model: str | None) -> Mention:
        """``resolve_mention`` against this table."""
        route = self.get(name)
        names_known = [] if route is not None or _is_node(name, nodes) else sorted(self.stored)
        return choose_mention(name, route, self.enabled, names_known, nodes, model)


async def aread_route_table(redis: AsyncRedis) -> RouteTable:
    """The whole table in one round trip (a cluster holds a handful of routes)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(names.ROUTES_HASH)
        pipe.exists(names.ROUTING_OFF_KEY)
        stored, off = await pipe.execute()
    return RouteTable({decoded(k): decoded(v) for k, v in stored.items()}, enabled=not off)


class AsyncRouteCache:
    """The route table re-read from Redis at most once per ``max_age_s``, as the cluster
    view is (``route_cache_s``): a ``model@name`` request then costs no round trip of its
    own, and a route added, changed or removed (or routing turned off) anywhere in the
    cluster takes effect here within that time. Concurrent callers share one read."""

    def __init__(self, redis: AsyncRedis, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._clock = clock
        self._table: tuple[float, RouteTable] | None = None
        self._lock: asyncio.Lock | None = None

    async def table(self, max_age_s: float) -> RouteTable:
        table = self._fresh(max_age_s)
        if table is not None:
            return table
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            table = self._fresh(max_age_s)  # read by the caller this one queued behind
            if table is None:
                read_at = self._clock()
                table = await aread_route_table(self._redis)
                self._table = (read_at, table)
            return table

    def _fresh(self, max_age_s: float) -> RouteTable | None:
        if self._table is not None and self._clock() - self._table[0] <= max_age_s:
            return self._table[1]
        return None

    async def mention(
        self,
        name: str,
        nodes: Sequence[NodeState],
        *,
        model: str | None = None,
        max_age_s: float,
    ) -> Mention:
        """``aresolve_mention`` on a table at most ``max_age_s`` old."""
        return (await self.table(max_age_s)).mention(name, nodes, model=model)


def _is_node(name: str, nodes: Sequence[NodeState]) -> bool:
    return any(state.name == name for state in nodes)


def choose_mention(
    name: str,
    route: Route | None,
    enabled: bool,
    route_names: Sequence[str],
    nodes: Sequence[NodeState],
    model: str | None,
) -> Mention:
    """The pure part of ``resolve_mention``: what was read from Redis in, the answer out."""
    if route is not None:
        if not enabled:
            raise ConfigError(f"@{route.name} is a route and routing is off: `corral route on`")
        wanted = model or route.model
        if wanted is None:
            raise ConfigError(f"route @{route.name} names no model: ask `@{route.name} --model M`")
        if not any(server.state.up for server in route_servers(route, nodes)):
            raise RoutingError(f"route @{route.name}: {missing_server_reason(route)}")
        # No node pinned: the router picks among the route's servers and moves the job on
        # among them only.
        return Mention(node=None, model=wanted, route=route)
    if _is_node(name, nodes):
        return Mention(node=name, model=model)
    nodes_known = sorted(state.name for state in nodes)
    close = difflib.get_close_matches(name.lower(), [*route_names, *nodes_known], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('@' + c for c in close)}?" if close else ""
    raise UnknownNode(
        f"no node named {name!r} (known nodes: {', '.join(nodes_known) or 'none'}) "
        f"and no route of that name{hint}"
    )
