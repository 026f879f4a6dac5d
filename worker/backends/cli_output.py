"""How an agent CLI is invoked and how its output reads: presets, text extraction, rate limits.

No processes here (see ``worker.backends.agent_cli``): what a line of output means is a pure
function, tested on its own.

The presets follow each CLI's documented non-interactive mode, prompt on stdin:

- ``claude -p`` (Claude Code) with ``--output-format stream-json --verbose
  --include-partial-messages``: one JSON object per line, the answer's text arriving in
  ``stream_event`` lines as ``event.delta.text``.
- ``codex exec -`` (OpenAI Codex CLI): progress on stderr, the final answer on stdout.
- ``gemini`` (Gemini CLI) reads a piped prompt and answers on stdout.
- ``opencode run`` (opencode) reads a piped prompt and answers on stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import ConfigError
from broker.schemas import ChatMessage
from worker.config import CliOutput, CliPresetName, CliSpec

__all__ = [
    "PRESETS",
    "CliInvocation",
    "invocation_for",
    "prompt_text",
    "rate_limit_in",
    "retry_after_in",
    "text_of_json_line",
]


@dataclass(frozen=True, slots=True)
class CliInvocation:
    """Everything needed to run one CLI and read its answer."""

    command: tuple[str, ...]
    model_flag: str
    """Empty: the CLI takes no model flag."""
    output: CliOutput = "text"
    text_path: tuple[str, ...] = ()
    match: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    rate_limit: tuple[re.Pattern[str], ...] = ()

    def argv(self, model: str) -> list[str]:
        return [*self.command, *((self.model_flag, model) if self.model_flag else ())]


@dataclass(frozen=True, slots=True)
class _Preset:
    command: tuple[str, ...]
    model_flag: str
    output: CliOutput = "text"
    text_path: str = ""
    match: Mapping[str, str] = field(default_factory=dict)


PRESETS: Mapping[CliPresetName, _Preset] = {
    "claude": _Preset(
        (
            "claude",
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--include-partial-messages",
        ),
        "--model",
        "jsonl",
        "event.delta.text",
        {"type": "stream_event", "event.delta.type": "text_delta"},
    ),
    "codex": _Preset(("codex", "exec", "-"), "--model"),
    "gemini": _Preset(("gemini",), "--model"),
    "opencode": _Preset(("opencode", "run"), "--model"),
}

DEFAULT_RATE_LIMIT_PATTERNS = (
    r"rate[ _-]?limit",
    r"usage limit",
    r"limit reached",
    r"too many requests",
    r"quota (?:exceeded|exhausted)",
    r"resource[ _-]?exhausted",
    r"\b429\b",
)
"""What agent CLIs print when the subscription's window is used up (Claude's "usage limit
reached", Codex's "You've hit your usage limit", Gemini's "429 ... RESOURCE_EXHAUSTED")."""


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(part for part in dotted.split(".") if part)


def invocation_for(spec: CliSpec) -> CliInvocation:
    """The spec's command, model flag and output format: its own fields over its preset's."""
    preset = PRESETS[spec.preset] if spec.preset else None
    command = spec.command or (preset.command if preset else ())
    if not command:
        raise ConfigError("a cli backend needs a preset or a command")
    output: CliOutput = spec.output or (preset.output if preset else "text")
    text_path = spec.text_path or (preset.text_path if preset else "")
    if output == "jsonl" and not text_path:
        raise ConfigError("a cli backend with jsonl output needs text_path (event.delta.text)")
    model_flag = spec.model_flag if spec.model_flag is not None else ""
    if spec.model_flag is None and preset:
        model_flag = preset.model_flag
    match = spec.match or (dict(preset.match) if preset and output == preset.output else {})
    try:
        patterns = tuple(
            re.compile(p, re.IGNORECASE)
            for p in (*DEFAULT_RATE_LIMIT_PATTERNS, *spec.rate_limit_patterns)
        )
    except re.error as exc:
        raise ConfigError(f"a cli backend's rate_limit_patterns has a bad pattern: {exc}") from None
    return CliInvocation(
        command=tuple(command),
        model_flag=model_flag,
        output=output,
        text_path=_path(text_path),
        match={_path(k): v for k, v in match.items()},
        rate_limit=patterns,
    )


def prompt_text(messages: Sequence[ChatMessage]) -> str:
    """What goes on the CLI's stdin: a lone user message as it is, else a labelled transcript."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    labels = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{labels[m.role]}: {m.content}" for m in messages)


def _lookup(document: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(document, dict) or part not in document:
            return None
        document = document[part]
    return document


def text_of_json_line(line: str, invocation: CliInvocation) -> str | None:
    """The answer text a JSON line carries; None for a line that carries none (or no JSON)."""
    try:
        document = json.loads(line)
    except ValueError:
        return None
    for path, wanted in invocation.match.items():
        if _lookup(document, path) != wanted:
            return None
    text = _lookup(document, invocation.text_path)
    return text if isinstance(text, str) else None


def rate_limit_in(text: str, invocation: CliInvocation) -> bool:
    return any(p.search(text) for p in invocation.rate_limit)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(
    r"(?:in|after|retry[- ]after:?|wait)\s+((?:\d+\s*(?:seconds?|secs?|s|minutes?|mins?|m|hours?|"
    r"hrs?|h|days?|d)\b[\s,]*(?:and\s+)?)+)",
    re.IGNORECASE,
)
_PART = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)
_EPOCH = re.compile(r"\|(\d{10})\b")
_CLOCK = re.compile(r"resets?\s+(?:at\s+)?(\d{1,2})(?::(\d{2}))?\s*(am|pm)?", re.IGNORECASE)


def retry_after_in(text: str, now: dt.datetime | None = None) -> float | None:
    """Seconds until the limit resets, when the message says ("try again in 2h 5m", "resets
    3pm", Claude's ``limit reached|1767225600``); None when it does not."""
    now = now or dt.datetime.now().astimezone()
    if found := _DURATION.search(text):
        return float(sum(int(n) * _UNITS[u.lower()] for n, u in _PART.findall(found.group(1))))
    if found := _EPOCH.search(text):
        return max(0.0, int(found.group(1)) - now.timestamp())
    if found := _CLOCK.search(text):
        hour, minute = int(found.group(1)), int(found.group(2) or 0)
        meridiem = (found.group(3) or "").lower()
        if meridiem:
            hour = hour % 12 + (12 if meridiem == "pm" else 0)
        if hour > 23 or minute > 59:
            return None
        reset = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if reset <= now:
            reset += dt.timedelta(days=1)
        return (reset - now).total_seconds()
    return None
