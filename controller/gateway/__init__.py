"""The HTTP front door: OpenAI- and Ollama-compatible APIs over the asyncio client, metrics.

Run it with ``corral serve`` (or ``python -m controller.gateway``).
"""

from controller.gateway.app import build_app

__all__ = ["build_app"]
