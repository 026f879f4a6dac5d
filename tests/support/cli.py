"""Running the ``corral`` CLI as a user does: its own process, against a test's broker."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.servers import REPO_ROOT


def corral(
    broker_url: str,
    *args: str,
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``corral ARGS`` in its own process, as a user's shell runs it: against ``broker_url``,
    with no provider key and no corral.yaml of the test process's environment (a controller
    never needs a key), the terminal's width left to rich; ``env`` adds variables."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_API_KEY") and k not in ("CORRAL_CONFIG", "COLUMNS")
    }
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        input=stdin,
        env={**inherited, **(env or {}), "CORRAL_BROKER_URL": broker_url},
        cwd=REPO_ROOT,
    )
