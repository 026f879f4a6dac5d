"""``notifications/tools/list_changed``: tell connected agents when the tool listing changed.

The descriptions of ``ask`` and ``fanout`` name the models, aliases and nodes that are up
(``describe.cluster_summary``), so the listing changes when corral.yaml is edited (aliases,
descriptions) or a node joins, leaves or loads another model. ``ToolListNotifier`` recomputes
that summary every second (the config file's ``stat``; the cluster view, cached for
``_NODES_MAX_AGE_S``) and, when it differs from the last one, notifies:

- clients on the 2026-07-28 protocol through the server's ``subscriptions/listen`` bus (they
  get it when they listen with ``tools_list_changed``);
- clients on the handshake-era protocols (what most hosts speak today) by a notification on
  their connection. The SDK keeps no list of connections, so ``RememberListers`` (a server
  middleware) remembers the session of each connection that listed the tools: those are the
  clients holding a listing that can go stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import SubscriptionBus, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from broker.errors import CorralError
from controller.aclient import AsyncCorralClient
from controller.mcp.describe import cluster_summary

log = logging.getLogger("corral.mcp")

_NODES_MAX_AGE_S = 2.0
_MAX_LISTERS = 256
"""Connections remembered at most (the oldest are forgotten): a bound on a busy HTTP server."""
_STDIO = "stdio"


class RememberListers:
    """Server middleware: remember the session of each handshake-era connection that lists
    the tools (keyed by its ``Mcp-Session-Id`` over HTTP; stdio has one connection)."""

    def __init__(self) -> None:
        self.sessions: dict[str, ServerSession] = {}

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        if ctx.method == "tools/list" and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            headers = getattr(ctx.request, "headers", None)
            key = headers.get("mcp-session-id", _STDIO) if headers is not None else _STDIO
            self.sessions.pop(key, None)
            self.sessions[key] = ctx.session
            while len(self.sessions) > _MAX_LISTERS:
                self.sessions.pop(next(iter(self.sessions)))
        return await call_next(ctx)


class ToolListNotifier:
    """Watches what the tool descriptions say and announces each change."""

    def __init__(
        self,
        client: AsyncCorralClient,
        bus: SubscriptionBus,
        listers: RememberListers,
        summary: str,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self._client = client
        self._bus = bus
        self._listers = listers
        self.summary = summary
        self.interval_s = interval_s

    async def check(self) -> bool:
        """Re-read config and cluster; notify and return True when the summary changed."""
        if self._client.config is not None:
            self._client.config.poll()
        try:
            nodes = await self._client.nodes(max_age_s=_NODES_MAX_AGE_S)
        except CorralError:
            return False  # Redis is away for now; the tools still describe the last view
        summary = cluster_summary(nodes, self._client.settings.aliases)
        if summary == self.summary:
            return False
        self.summary = summary
        await self.notify()
        return True

    async def notify(self) -> None:
        await self._bus.publish(ToolsListChanged())
        for key, session in list(self._listers.sessions.items()):
            try:
                await session.send_tool_list_changed()
            except Exception:  # noqa: BLE001 -- a closed connection: forget it, notify the rest
                self._listers.sessions.pop(key, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("checking for tool listing changes failed")


__all__ = ["RememberListers", "ToolListNotifier"]
