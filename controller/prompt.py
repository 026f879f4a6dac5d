"""Reading routing hints out of what the user typed."""

from __future__ import annotations

import re

from broker.errors import ConfigError

_MENTION = re.compile(r"^\s*@(\S*)\s*")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def split_mention(prompt: str) -> tuple[str | None, str]:
    """``"@pi2 why is the sky blue"`` -> ``("pi2", "why is the sky blue")``."""
    match = _MENTION.match(prompt)
    if match is None:
        return None, prompt.strip()
    name = match.group(1)
    if not _NAME.match(name):
        raise ConfigError(f"@{name} is not a node name (letters, digits, '.', '_', '-')")
    rest = prompt[match.end() :].strip()
    if not rest:
        raise ConfigError(f"nothing to ask after @{name}")
    return name, rest


def parse_tags(values: tuple[str, ...]) -> frozenset[str]:
    """``--tag code --tag gpu`` or ``--tag code,gpu``."""
    return frozenset(t.strip() for v in values for t in v.split(",") if t.strip())
