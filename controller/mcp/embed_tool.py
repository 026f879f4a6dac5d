"""The MCP ``embed`` tool: texts in, one vector each, from a node with an embedding model."""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from broker.errors import CorralError
from controller.aclient import AsyncCorralClient
from controller.embedding import make_embed_spec
from controller.mcp.targets import resolve_target

_EMBED = (
    "Turn texts into embedding vectors (for search, clustering, similarity) with an embedding "
    "model of the cluster (list_models shows which models embed). One vector per text, in "
    "order, as structured content {model, node, embeddings, prompt_tokens}."
)


def add_embed_tool(server: MCPServer[Any], client: AsyncCorralClient) -> None:
    @server.tool(description=_EMBED)
    async def embed(
        inputs: Annotated[
            list[str], Field(description="The texts, one vector each.", min_length=1)
        ],
        model: Annotated[
            str | None,
            Field(description="An embedding model or alias; default: any embedding model."),
        ] = None,
        node: Annotated[
            str | None, Field(description="Run on this named route or node (see list_nodes).")
        ] = None,
    ) -> CallToolResult:
        try:
            target = await resolve_target(client, node, model)
            spec = make_embed_spec(inputs, model=target.model, node=target.node, route=target.route)
            result = await client.run_embed(spec)
        except CorralError as exc:
            raise ToolError(str(exc)) from None
        structured = {
            "job_id": result.job_id,
            "model": result.model,
            "node": result.node,
            "embeddings": [list(v) for v in result.embeddings],
            "prompt_tokens": result.usage.prompt_tokens,
        }
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(structured))],
            structured_content=structured,
        )
