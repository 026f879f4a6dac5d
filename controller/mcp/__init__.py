"""The agent front door: corral's cluster as MCP tools and resources (the official mcp SDK)."""

from controller.mcp.main import main
from controller.mcp.server import build_server

__all__ = ["build_server", "main"]
