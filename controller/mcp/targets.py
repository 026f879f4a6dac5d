"""A tool's ``node`` argument read as ``@name`` is: a named route (its node and model) or a
node."""

from __future__ import annotations

from dataclasses import dataclass

from controller.aclient import AsyncCorralClient
from controller.routes import aresolve_mention


@dataclass(frozen=True)
class Target:
    node: str | None
    model: str | None
    route: str | None = None
    route_url: str | None = None


async def resolve_target(client: AsyncCorralClient, node: str | None, model: str | None) -> Target:
    """Where a tool call asked to run; raises the library's RoutingError for an unknown name."""
    if node is None:
        return Target(None, model)
    nodes = await client.nodes(max_age_s=client.settings.route_cache_s)
    mention = await aresolve_mention(node, client.redis, nodes, model=model)
    return Target(mention.node, mention.model, mention.route_name, mention.route_url)
