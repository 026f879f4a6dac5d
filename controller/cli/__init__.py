"""The terminal front door: the ``corral`` command, its rendering, the demo."""

from controller.cli.commands import cli, main
from controller.cli.common import ExitCode

__all__ = ["ExitCode", "cli", "main"]
