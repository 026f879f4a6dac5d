"""``--effort`` in each model family's own words.

corral's four levels (minimal, low, medium, high) become OpenAI's ``reasoning_effort`` labels,
an Anthropic ``thinking`` budget, a Gemini ``thinkingConfig.thinkingBudget`` or Ollama's
``think`` flag. Whether a model has such a control at all is the capability table's
``thinking`` column; the job runner asks ``reasoning_control`` first and drops the effort
(with a note on the result) for a model without one, so the adapters only translate.
"""

from __future__ import annotations

from typing import Any

from broker.catalog import Catalog
from broker.schemas import BackendKind, Effort

__all__ = [
    "ANTHROPIC_THINKING_BUDGETS",
    "GEMINI_THINKING_BUDGETS",
    "anthropic_thinking",
    "effort_ignored_note",
    "gemini_thinking_budget",
    "ollama_think",
    "openai_reasoning_effort",
    "reasoning_control",
]

KINDS_WITH_A_CONTROL: frozenset[BackendKind] = frozenset(
    {"openai-cloud", "anthropic", "google", "ollama"}
)
"""Transports whose wire format carries a reasoning control corral maps onto. DeepSeek's
reasoner always reasons and Mistral's API has no effort field; an OpenAI-compatible local
server is not assumed to understand ``reasoning_effort``."""

ANTHROPIC_THINKING_BUDGETS: dict[Effort, int | None] = {
    "minimal": None,  # thinking stays off
    "low": 1024,  # the smallest budget Anthropic accepts
    "medium": 8192,
    "high": 24576,
}

GEMINI_THINKING_BUDGETS: dict[Effort, int] = {
    "minimal": 0,  # off, where the model allows it (2.5 Flash); 2.5 Pro's floor is 128
    "low": 1024,
    "medium": 8192,
    "high": 24576,
}
GEMINI_PRO_MIN_BUDGET = 128


def reasoning_control(kind: BackendKind, model: str, catalog: Catalog) -> bool:
    """Whether ``--effort`` means anything to ``model`` on a backend of ``kind``."""
    if kind not in KINDS_WITH_A_CONTROL:
        return False
    caps = catalog.capabilities(kind, model)
    return bool(caps is not None and caps.thinking)


def effort_ignored_note(model: str) -> str:
    return f"effort ignored: {model} has no reasoning control"


def openai_reasoning_effort(effort: Effort, model: str) -> str:
    """OpenAI's label: its o-series models know no ``minimal`` (GPT-5 does)."""
    if effort == "minimal" and model.startswith("o"):
        return "low"
    return effort


def anthropic_thinking(effort: Effort) -> dict[str, Any] | None:
    """The Messages API's ``thinking`` field, or None to leave thinking off."""
    budget = ANTHROPIC_THINKING_BUDGETS[effort]
    if budget is None:
        return None
    return {"type": "enabled", "budget_tokens": budget}


def gemini_thinking_budget(effort: Effort, model: str) -> int:
    budget = GEMINI_THINKING_BUDGETS[effort]
    if "pro" in model:
        return max(budget, GEMINI_PRO_MIN_BUDGET)  # Pro cannot switch thinking off
    return budget


def ollama_think(effort: Effort, model: str) -> bool | str:
    """Ollama's ``think``: a level for gpt-oss (which takes low/medium/high), else on or off."""
    if model.startswith("gpt-oss"):
        return "low" if effort == "minimal" else effort
    return effort != "minimal"
