"""Ollama's keep_alive durations, read the same way by the controller (to refuse a typo at
once) and by the node (to apply it)."""

from __future__ import annotations

import math
import re

# Go's time.ParseDuration units, which Ollama's keep_alive uses ("5m", "1h30m", "-1s").
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def keep_alive_seconds(keep_alive: str) -> float | None:
    """Seconds a ``keep_alive`` keeps a model loaded; None for a negative one (forever).

    Accepts what Ollama accepts: a number of seconds ("300", "-1") or a Go duration ("30m",
    "1h30m", "-1m"); "0" means unload now. Raises ValueError for anything else.
    """
    text = keep_alive.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _go_duration_seconds(text)
    if not math.isfinite(seconds):
        raise ValueError(f"keep_alive {keep_alive!r} is not a duration")
    return None if seconds < 0 else seconds


def _go_duration_seconds(text: str) -> float:
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    position, total = 0, 0.0
    for match in _GO_DURATION.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _GO_UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise ValueError(
            f"keep_alive {text!r} is not a duration: use seconds or a unit, e.g. 300, 30m, 1h, -1"
        )
    return sign * total
