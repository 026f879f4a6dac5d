"""``python -m controller.mcp`` is corral's MCP server (``corral mcp`` execs it)."""

from controller.mcp.main import main

main(prog_name="corral mcp")
