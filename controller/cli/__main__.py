"""``python -m controller.cli`` is the ``corral`` command."""

from controller.cli import main

main()
