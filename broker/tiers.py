"""Tiers of cost: local nodes first, subscriptions next, metered APIs last.

A backend's tier follows from its kind: a node's own server (Ollama, llama.cpp, the simulated
backend) costs nothing per token; an agent CLI runs on a flat subscription with a usage
window; a cloud API is billed per token. The router tries a model's routes cheapest tier
first, and the answer says which tier served it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

Tier = Literal["local", "subscription", "metered"]

TIER_ORDER: Mapping[str, int] = {"local": 0, "subscription": 1, "metered": 2}
"""Cheapest first: the router's sort position of each tier."""

_METERED_KINDS = frozenset({"anthropic", "google", "openai-cloud", "mistral", "deepseek"})
_SUBSCRIPTION_KINDS = frozenset({"cli"})


def tier_of_kind(kind: str) -> Tier:
    """The tier of a backend kind; an unknown kind (a newer worker's) counts as local."""
    if kind in _METERED_KINDS:
        return "metered"
    if kind in _SUBSCRIPTION_KINDS:
        return "subscription"
    return "local"


__all__ = ["TIER_ORDER", "Tier", "tier_of_kind"]
